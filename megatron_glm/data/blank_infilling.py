"""GLM's autoregressive blank infilling: packed windows -> static-shape batch rows.

A row (DESIGN.md, "Batch contract") is ``part A | part B | padding``, ``S`` tokens long:

* part A is the window with every chosen span replaced by one mask token
  (``[MASK]`` span task, ``[sMASK]`` sentence task, ``[gMASK]`` document task);
* part B holds the spans in shuffled order, each as input ``[sop] x1..xn`` with targets
  ``x1..xn [eop]``; loss_mask is 1 exactly there;
* padding (``pad`` = eos) follows ``valid_len``; its targets are pad, loss 0, positions 0.

Part A targets equal part A tokens (inert: loss 0). Positions: part A position = index in the
corrupted text, block position 0; every token of a span in part B takes the position of its
mask token and block position ``1..len+1`` (1 at ``[sop]``).

Tasks (one per row, drawn with ``span_prob`` / ``sentence_prob`` / ``document_prob``; GLM's
original draws one per micro-batch, we draw per row so every batch carries every task):

* span: lengths ~ Poisson(lambda) conditioned on ``1..max_span_length`` are drawn until they
  cover ``T = mask_ratio * L`` tokens (``L`` = window length). The span that crosses ``T`` is
  kept with probability ``(T - covered_before) / its_length``, which makes the expected masked
  count exactly ``T`` (GLM always keeps it and overshoots by ~2 tokens per row). At least one
  span is kept. With probability ``single_span_prob`` the row instead gets one span of Poisson
  length (GLM's ``single_span_prob`` semantics). Spans never contain an eos (eos is never
  masked, as in GLM, so a span never crosses a document boundary) and two spans are always
  separated by at least one unmasked token.
* sentence: the window is cut into units at ``window.sentence_starts`` and around every eos;
  units (whole sentences, or the sentence fragments at the window edges, never containing eos)
  are taken in random order until they cover ``sentence_ratio * L`` with the same unbiased
  keep-last rule; at least one unit. Two chosen sentences may be adjacent (two ``[sMASK]``
  in a row). A window with one sentence masks that sentence.
* document: one ``[gMASK]`` span = the suffix of ``round(r * L)`` tokens (clipped to 1..L),
  ``r ~ U(document_min_ratio, document_max_ratio)``. Like GLM's generation task on packed
  data, the suffix may contain eos (the model learns to end a document and start the next).

Static shape rule. A row is ``L + 2 n`` tokens long (each span gives one mask in part A and
one extra token, ``[sop]``/``[eop]``, in part B). With ``n_max`` the span budget,
``window_length = S - 2 n_max``, so every row fits ``S``. ``n_max`` is the smallest integer
such that ``n_max >= E[n] + 4 sd[n] + 1`` for the span task on a full window, where by renewal
theory ``E[n] ~= T / mu + 1`` and ``Var[n] ~= T sigma^2 / mu^3`` (``mu``, ``sigma^2`` of the
truncated Poisson). At S=512 with the defaults this gives ``window_length = 446``,
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

Vectorisation. :meth:`BlankInfilling.batch` builds a whole micro-batch with one pass of numpy
operations: the windows are concatenated with one eos between them (so no run crosses a row)
and every per-span and per-token step works on the concatenation with per-row offsets. Per-row
numpy costs ~70 small operations whose dispatch overhead dominates; batching amortises it
(``tools/bench/bench_collator.py``). :meth:`BlankInfilling.__call__` is a batch of one, and
``GLMPretrainDataset.__getitems__`` uses :meth:`batch` for DataLoader batches.

Determinism: a row's random numbers are the SplitMix64 stream (a counter-based generator: draw
``j`` is ``mix(key + (j + 1) * golden)``) keyed by ``mix(mix(seed_key + (epoch << 40 | index)))``.
A row is therefore a pure function of (seed, epoch, sample index), its window and the forced
objective, whatever the batch it is built in, the worker count, rank or resume point: every
step uses row-local quantities only (global offsets are exact integer shifts). Draws ``[0, R)``
are fixed per row (task, coins, lengths, anchors, part-B order); sentence units use draw
``R + start``; moving spans out of full documents uses draws from ``R + window_length``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from megatron_glm.config import ObjectiveConfig

OBJECTIVES: tuple[str, ...] = ("span", "sentence", "document")
"""Task names; a row's ``objective`` code is the index in this tuple."""

_INDEX_BITS = 40  # sample index bits of a row key; the epoch takes the bits above
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_SHIFTS = (np.uint64(30), np.uint64(27), np.uint64(31), np.uint64(11))
_TO_UNIT = 1.0 / 2.0**53


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


@dataclass(frozen=True)
class SpecialIds:
    """Token ids blank infilling writes; ``pad`` is eos (DESIGN.md, "Data")."""

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
    raise ValueError(
        f"config field 'data.seq_length': {seq_length} is too short for blank infilling with "
        f"mask_ratio={cfg.mask_ratio}, poisson_lambda={cfg.poisson_lambda}: no room for a "
        "window and its span budget"
    )


def _mix(z: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser (a bijection of uint64), in place on ``z``."""
    s30, s27, s31, _ = _SHIFTS
    z ^= z >> s30
    z *= _MIX1
    z ^= z >> s27
    z *= _MIX2
    z ^= z >> s31
    return z


def _uniforms(keys: np.ndarray, counters: np.ndarray) -> np.ndarray:
    """Draw ``counters`` of the SplitMix64 streams ``keys`` (broadcast), as floats in [0, 1)."""
    z = keys + (counters.astype(np.uint64) + np.uint64(1)) * _GOLDEN
    return (_mix(z) >> _SHIFTS[3]) * _TO_UNIT


def _splitmix_int(x: int) -> int:
    """Python-int SplitMix64 finaliser, for the per-instance seed key."""
    m = (1 << 64) - 1
    x = (x + 0x9E3779B97F4A7C15) & m
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & m
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & m
    return x ^ (x >> 31)


def _order(group: np.ndarray, frac: np.ndarray) -> np.ndarray:
    """Stable order by (group, frac) for non-negative int groups and ``frac`` in [0, 1).

    One stable argsort of ``group << 31 | floor(frac * 2**31)``: ~8x cheaper than np.lexsort
    here. Fractions equal in their top 31 bits keep their input order, which callers always
    give in row-local order, so results never depend on the rest of the batch.
    """
    key = (group << 31) | (frac * 2147483648.0).astype(np.int64)
    return key.argsort(kind="stable")


def _group_bounds(sorted_ids: np.ndarray, groups: int) -> tuple[np.ndarray, np.ndarray]:
    """For non-decreasing ids in ``[0, groups)``: per element, the index of the first element
    of its group and the group's size (bincount is several times cheaper than searchsorted)."""
    counts = np.bincount(sorted_ids, minlength=groups)
    first = np.add.accumulate(counts) - counts
    return first.repeat(counts), counts.repeat(counts)


def _group_first(sorted_ids: np.ndarray, groups: int) -> np.ndarray:
    """Per element of non-decreasing ids in ``[0, groups)``: index of its group's first one."""
    return _group_bounds(sorted_ids, groups)[0]


@dataclass
class _Spans:
    """Spans of a batch: row, start inside the row, length (int64 [N] each)."""

    row: np.ndarray
    start: np.ndarray
    length: np.ndarray


@dataclass
class _Flat:
    """The batch's windows concatenated, one eos after each (so no document crosses rows)."""

    tokens: np.ndarray  # int64 [F], F = sum(L + 1)
    offset: np.ndarray  # int64 [B] where each row starts in ``tokens``
    length: np.ndarray  # int64 [B] window lengths L
    eos_pos: np.ndarray  # int64 [E] eos positions in ``tokens`` (separators included)


@dataclass
class _Runs:
    """Eos-free runs (documents) of a ``_Flat``; every eos ends one run (int64 arrays)."""

    start: np.ndarray  # [D] flat position of each run
    length: np.ndarray  # [D] tokens in each run (0 between two eos)
    end_mass: np.ndarray  # [D] non-eos tokens of the batch up to each run's end
    first: np.ndarray  # [B] first run of each row
    stop: np.ndarray  # [B] one past the last run of each row
    mass_off: np.ndarray  # [B] non-eos tokens before each row
    mass: np.ndarray  # [B] non-eos tokens of each row


def _runs(flat: _Flat) -> _Runs:
    eos = flat.eos_pos  # the batch ends with a separator, so the last run ends at eos[-1]
    start = np.concatenate((_ZERO, eos[:-1] + 1))
    length = eos - start
    first = eos.searchsorted(flat.offset)
    stop = eos.searchsorted(flat.offset + flat.length) + 1
    mass_off = flat.offset - first
    mass = flat.length - (stop - 1 - first)
    return _Runs(start, length, np.add.accumulate(length), first, stop, mass_off, mass)


def _admit(
    run: np.ndarray, rel: np.ndarray, block: np.ndarray, used: np.ndarray, cap: np.ndarray
) -> np.ndarray:
    """Admit spans into runs in order of ``rel`` while their blocks fit ``cap``; ``used`` (per
    run) is updated in place. Returns the admitted mask, in the input order."""
    order = _order(run, rel)
    r, b = run[order], block[order]
    cb = np.add.accumulate(b)
    inside = cb - (cb - b)[_group_first(r, cap.shape[0])]  # blocks up to and incl. this one
    ok_sorted = used[r] + inside <= cap[r]
    used += np.bincount(r[ok_sorted], weights=b[ok_sorted], minlength=cap.shape[0]).astype(np.int64)
    ok = np.empty(run.shape[0], dtype=bool)
    ok[order] = ok_sorted
    return ok


class BlankInfilling:
    """Turns packed windows into blank-infilling rows (see the module docstring).

    ``batch`` builds a micro-batch at once; calling the object builds one row. Stateless after
    construction (safe to share across threads and to copy into DataLoader workers).
    """

    def __init__(self, cfg: ObjectiveConfig, *, seq_length: int, ids: SpecialIds, seed: int):
        if not 0 <= seed < 2**64:
            raise ValueError(f"config field 'train.seed': {seed} must be in [0, 2**64)")
        self.cfg = cfg
        self.seq_length = seq_length
        self.ids = ids
        self.seed = seed
        self.window_length, self.max_spans = span_budget(cfg, seq_length)
        self._cdf, self.span_mean, _ = truncated_poisson(cfg.poisson_lambda, cfg.max_span_length)
        # Enough length draws to always reach T: every length is >= 1.
        self._num_lengths = math.ceil(cfg.mask_ratio * self.window_length) + 1
        self._anchor0 = 4 + self._num_lengths  # draws: 4 coins, lengths, anchors, part-B keys
        self._order0 = self._anchor0 + self.max_spans
        self._num_draws = self._order0 + self.max_spans
        self._refit0 = self._num_draws + self.window_length  # after the sentence-unit draws
        self._draw_ids = np.arange(self._num_draws, dtype=np.uint64)
        self._seed_key = np.uint64(_splitmix_int(seed))
        self._task_cdf = np.add.accumulate([cfg.span_prob, cfg.sentence_prob, cfg.document_prob])
        self._mask_of_task = np.array([ids.mask, ids.smask, ids.gmask], dtype=np.int64)
        self._cols = _arange(seq_length)  # read-only column index

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
        u = _uniforms(keys[:, None], self._draw_ids[None, :])  # [B, R]
        code = self._tasks(u[:, 0], objectives)  # [B]
        parts = []
        rows = (code == 0).nonzero()[0]
        if rows.shape[0]:
            parts.append(self._span_task(rows, flat, u, keys))
        rows = (code == 1).nonzero()[0]
        if rows.shape[0]:
            parts.append(self._sentence_task(rows, flat, u, keys, windows))
        rows = (code == 2).nonzero()[0]
        if rows.shape[0]:
            parts.append(self._document_task(rows, flat, u))
        spans = _Spans(*(np.concatenate([getattr(p, f) for p in parts]) for f in _SPAN_FIELDS))
        # Each task's spans are sorted by (row, start) and a row has one task: a stable sort by
        # row sorts them all by (row, start).
        order = spans.row.argsort(kind="stable")
        spans = _Spans(spans.row[order], spans.start[order], spans.length[order])
        return self._assemble(flat, spans, code, u)

    # ------------------------------------------------------------------ inputs

    def _concatenate(self, windows: Sequence[WindowLike]) -> _Flat:
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
        return _Flat(flat, offset, length, eos_pos)

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
        return _mix(_mix(x + self._seed_key))

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

    # ------------------------------------------------------------------ tasks
    # The hot path calls ufunc methods (np.add.accumulate) and ndarray methods
    # (a.searchsorted, a.repeat, a.nonzero) rather than the np.* wrappers, whose
    # Python-level dispatch costs several times the work on small arrays.

    def _span_task(self, rows: np.ndarray, flat: _Flat, u: np.ndarray, keys: np.ndarray) -> _Spans:
        """Span-task spans of ``rows`` (see the module docstring)."""
        ur = u[rows]  # [n, R]
        lens = self._cdf.searchsorted(ur[:, 4 : self._anchor0], "right") + 1  # [n, K]
        target = self.cfg.mask_ratio * flat.length[rows]  # [n]
        count = _keep_last_counts(lens, target, ur[:, 2])
        np.minimum(count, self.max_spans, out=count)
        count[ur[:, 1] < self.cfg.single_span_prob] = 1
        runs = _runs(flat)
        count[runs.mass[rows] == 0] = 0
        i, draw = (_arange(lens.shape[1])[None, :] < count[:, None]).nonzero()
        row = rows[i]
        length = lens[i, draw]
        # Anchor: a uniform non-eos token of the row (integer part exact, batch-independent).
        local = ur[i, self._anchor0 + draw] * runs.mass[row]
        run = runs.end_mass.searchsorted(runs.mass_off[row] + local.astype(np.int64), "right")
        rlen = runs.length[run]
        rel = (local - (runs.end_mass[run] - rlen - runs.mass_off[row])) / rlen  # [N] in [0, 1)
        cap = runs.length + 1  # a run of s tokens holds blocks (span + 1) of total s + 1
        used = np.zeros(cap.shape[0], dtype=np.int64)
        pending = ~_admit(run, rel, length + 1, used, cap)
        dropped = np.zeros(row.shape[0], dtype=bool)
        for rnd in range(_REFIT_ROUNDS):
            if np.count_nonzero(pending) == 0:
                break
            self._refit_round(rnd, pending, dropped, row, run, rel, length, draw, runs, used, keys)
        keep = ~(dropped | pending)
        row, run, rel, length = row[keep], run[keep], rel[keep], length[keep]
        order = _order(run, rel)
        row, run, rel, length = row[order], run[order], rel[order], length[order]
        block = length + 1
        cb = np.add.accumulate(block)
        before = cb - block
        before -= before[_group_first(run, cap.shape[0])]  # blocks before it inside its run
        slack = cap[run] - used[run]  # free tokens of the run, spread by stars and bars
        place = (rel * (slack + 1)).astype(np.int64)
        np.minimum(place, slack, out=place)
        spans = _Spans(row, runs.start[run] + place + before - flat.offset[row], length)
        empty = (np.bincount(row, minlength=flat.length.shape[0])[rows] == 0) & (
            runs.mass[rows] > 0
        )
        if np.count_nonzero(empty):
            spans = self._one_span_rows(spans, rows[empty], lens[empty, 0], runs, flat, keys)
        return spans

    def _refit_round(
        self,
        rnd: int,
        pending: np.ndarray,
        dropped: np.ndarray,
        row: np.ndarray,
        run: np.ndarray,
        rel: np.ndarray,
        length: np.ndarray,
        draw: np.ndarray,
        runs: _Runs,
        used: np.ndarray,
        keys: np.ndarray,
    ) -> None:
        """Move pending spans (their document was full) to a run of their row with free
        tokens, chosen in proportion to them; updates the arrays in place."""
        p = pending.nonzero()[0]
        rp = row[p]
        free = np.maximum(runs.length - used, 0)  # cap - used - 1
        wc = np.add.accumulate(free)
        first = runs.first[rp]
        lo = np.where(first > 0, wc[first - 1], 0)
        hi = wc[runs.stop[rp] - 1]
        full = hi <= lo
        dropped[p[full]] = True
        pending[p[full]] = False
        p, rp, lo, hi = p[~full], rp[~full], lo[~full], hi[~full]
        c0 = self._refit0 + 2 * rnd * self.max_spans
        pick = (_uniforms(keys[rp], draw[p] + c0) * (hi - lo)).astype(np.int64)
        new_run = wc.searchsorted(lo + pick, "right")
        new_rel = _uniforms(keys[rp], draw[p] + c0 + self.max_spans)
        ok = _admit(new_run, new_rel, length[p] + 1, used, runs.length + 1)
        moved = p[ok]
        run[moved] = new_run[ok]
        rel[moved] = new_rel[ok]
        pending[moved] = False

    def _one_span_rows(
        self,
        spans: _Spans,
        rows: np.ndarray,
        first_len: np.ndarray,
        runs: _Runs,
        flat: _Flat,
        keys: np.ndarray,
    ) -> _Spans:
        """Rows whose drawn spans all fit nowhere get one span as long as their longest
        document allows, at a uniform place in it (rare: only documents shorter than spans)."""
        parts = [spans]
        c0 = self._refit0 + 2 * _REFIT_ROUNDS * self.max_spans
        for b, want in zip(rows.tolist(), first_len.tolist(), strict=True):
            d = int(runs.first[b] + np.argmax(runs.length[runs.first[b] : runs.stop[b]]))
            n = min(int(want), int(runs.length[d]))
            u0 = float(_uniforms(keys[b : b + 1], np.array([c0]))[0])
            start = int(runs.start[d]) + int(u0 * (int(runs.length[d]) - n + 1))
            start -= int(flat.offset[b])
            parts.append(_Spans(np.array([b]), np.array([start]), np.array([n])))
        return _Spans(*(np.concatenate([getattr(p, f) for p in parts]) for f in _SPAN_FIELDS))

    def _sentence_task(
        self,
        rows: np.ndarray,
        flat: _Flat,
        u: np.ndarray,
        keys: np.ndarray,
        windows: Sequence[WindowLike],
    ) -> _Spans:
        """Whole sentence units (never containing eos) covering ~sentence_ratio."""
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
        real = (flat.tokens[ustart] != self.ids.eos) & chosen[urow]  # eos units are length 1
        ustart, ulen, urow = ustart[real], ulen[real], urow[real]
        local = ustart - flat.offset[urow]
        key = _uniforms(keys[urow], local + self._num_draws)  # random order inside each row
        order = _order(urow, key)
        olen, orow = ulen[order], urow[order]
        cum = np.add.accumulate(olen)
        first = _group_first(orow, flat.length.shape[0])
        excl = cum - olen
        excl -= excl[first]  # covered before this unit, inside its row
        rank = _arange(order.shape[0]) - first
        target = self.cfg.sentence_ratio * flat.length[orow]
        taken = _keep_last_mask(excl, olen, target, u[orow, 2], rank)
        taken &= rank < self.max_spans
        pick = np.sort(order[taken])  # back to text order
        return _Spans(urow[pick], local[pick], ulen[pick])

    def _document_task(self, rows: np.ndarray, flat: _Flat, u: np.ndarray) -> _Spans:
        """One suffix span of round(r * L) tokens, r ~ U(min_ratio, max_ratio)."""
        lo, hi = self.cfg.document_min_ratio, self.cfg.document_max_ratio
        length = flat.length[rows]
        gen = np.rint((lo + (hi - lo) * u[rows, 3]) * length).astype(np.int64)
        np.clip(gen, 1, length, out=gen)
        return _Spans(rows, length - gen, gen)

    # ------------------------------------------------------------------ row layout

    def _assemble(
        self, flat: _Flat, spans: _Spans, code: np.ndarray, u: np.ndarray
    ) -> dict[str, np.ndarray]:
        """Lay out part A, part B and padding of every row; spans sorted by (row, start)."""
        S, ids = self.seq_length, self.ids
        B = code.shape[0]
        row, start, length = spans.row, spans.start, spans.length
        N = row.shape[0]
        first, size = _group_bounds(row, B)
        rank = _arange(N) - first  # span number inside its row
        shrink = length - 1  # tokens each span removes from part A
        cs = np.add.accumulate(shrink)
        removed = cs - shrink
        removed -= removed[first]  # removed before this span, inside its row
        mask_pos = start - removed  # [N] mask positions in part A
        row_removed = np.zeros(B, dtype=np.int64)  # per-row total, via the row's last span
        last = first + size - 1
        row_removed[row[last]] = removed[last] + shrink[last]
        sep = flat.length - row_removed  # [B]
        valid = flat.length + 2 * np.bincount(row, minlength=B)  # [B] L + 2 n
        # Part A: the concatenated windows minus span interiors and row separators, then each
        # span's first token replaced by its mask. (Index arrays from nonzero + take: numpy's
        # boolean-mask indexing is several times slower here.)
        first_flat = flat.offset[row] + start  # [N] span starts in the concatenation
        delta = np.zeros(flat.tokens.shape[0] + 1, dtype=np.int64)
        delta[first_flat + 1] = 1
        delta[first_flat + length] -= 1  # ends never coincide with another span's start + 1
        inside = np.add.accumulate(delta[:-1])  # [F] 1 inside a span (after its first token)
        inside[flat.offset + flat.length] = 1  # separators
        tok_a = flat.tokens.take((inside == 0).nonzero()[0])  # [sum(sep)]
        off_a = np.add.accumulate(sep) - sep  # [B] row starts in tok_a
        tok_a[off_a[row] + mask_pos] = self._mask_of_task[code[row]]
        # Row-major slot indices of each part in the [B, S] grid: their order is exactly the
        # order of the concatenated parts.
        cols = self._cols[None, :]
        in_a = cols < sep[:, None]  # [B, S]
        in_b = (cols < valid[:, None]) ^ in_a  # sep <= j < valid
        slot_a = in_a.reshape(-1).nonzero()[0]
        tokens = np.full(B * S, ids.pad, dtype=np.int64)
        tokens[slot_a] = tok_a
        targets = tokens.copy()  # part A targets = part A tokens
        pos = np.zeros((B, 2, S), dtype=np.int64)
        pos[:, 0] = np.where(in_a, cols, 0)
        if N:
            # Part B: row by row, each row's spans in random order; block = [sop] x1..xn.
            order = _order(row, u[row, self._order0 + rank])
            blen = length[order] + 1
            bend = np.add.accumulate(blen)
            bstart = bend - blen
            total_b = int(bend[-1])
            sid = order.repeat(blen)  # [nb] span of each part-B slot
            r = _arange(total_b) - bstart.repeat(blen)  # [nb] offset inside the block
            # At r == len this reads the token after the span (at most the row's separator);
            # it is the [eop] slot, overwritten next.
            tgt_b = flat.tokens[flat.offset[row[sid]] + start[sid] + r]
            tgt_b[bend - 1] = ids.eop
            tok_b = np.empty_like(tgt_b)
            tok_b[1:] = tgt_b[:-1]
            tok_b[bstart] = ids.sop
            slot_b = in_b.reshape(-1).nonzero()[0]
            tokens[slot_b] = tok_b
            targets[slot_b] = tgt_b
            pos_b = slot_b + (slot_b // S) * S  # (b, j) -> (b, 0, j) in the [B, 2, S] layout
            flat_pos = pos.reshape(-1)
            flat_pos[pos_b] = mask_pos[sid]
            flat_pos[pos_b + S] = r + 1
        return {
            "tokens": tokens.reshape(B, S),
            "targets": targets.reshape(B, S),
            "loss_mask": in_b.astype(np.float32),
            "position_ids": pos,
            "sep": sep,
            "valid_len": valid,
            "objective": code.astype(np.int64),
        }


_SPAN_FIELDS = ("row", "start", "length")
_REFIT_ROUNDS = 4  # rounds moving spans out of full documents before leaving them out
_ZERO = np.zeros(1, dtype=np.int64)


def _arange(n: int) -> np.ndarray:
    return np.arange(n, dtype=np.int64)


def _keep_last_counts(lens: np.ndarray, target: np.ndarray, coin: np.ndarray) -> np.ndarray:
    """Per row of ``lens`` [n, K]: how many leading lengths to keep (unbiased keep-last rule).

    Lengths are taken in order until their sum reaches ``target``; the crossing one is kept with
    probability ``(target - covered_before) / its_length``, so the expected covered length is
    exactly ``target``. At least one. Needs ``sum(lens[i]) > target[i]`` (true by construction).
    """
    cum = np.add.accumulate(lens, axis=1)  # [n, K]
    k = np.add.reduce(cum < target[:, None], axis=1)  # first index with cum >= target
    rows = _arange(lens.shape[0])
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
