"""Arrays and vectorised primitives shared by the blank-infilling samplers and row assembly.

A micro-batch is built with one pass of numpy operations over all its rows (see
:mod:`megatron_glm.data.blank_infilling`, "Vectorisation"): the windows are concatenated
(:class:`Flat`), their documents are the eos-free runs of the concatenation (:class:`Runs`),
and every task returns its spans as parallel arrays (:class:`Spans`). The helpers here work on
such arrays with per-row offsets; none of them ever lets one row's result depend on another's.

Random numbers are SplitMix64 streams (a counter-based generator: draw ``j`` of key ``k`` is
``mix(k + (j + 1) * golden)``), so any draw of any row is computed directly, in any batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "Flat",
    "Runs",
    "Spans",
    "arange",
    "concat_spans",
    "group_bounds",
    "group_first",
    "mix",
    "order",
    "runs_of",
    "splitmix_int",
    "uniforms",
]

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_SHIFTS = (np.uint64(30), np.uint64(27), np.uint64(31), np.uint64(11))
_TO_UNIT = 1.0 / 2.0**53
_ZERO = np.zeros(1, dtype=np.int64)


# ----------------------------------------------------------------------------- random draws


def mix(z: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser (a bijection of uint64), in place on ``z``."""
    s30, s27, s31, _ = _SHIFTS
    z ^= z >> s30
    z *= _MIX1
    z ^= z >> s27
    z *= _MIX2
    z ^= z >> s31
    return z


def uniforms(keys: np.ndarray, counters: np.ndarray) -> np.ndarray:
    """Draw ``counters`` of the SplitMix64 streams ``keys`` (broadcast), as floats in [0, 1)."""
    z = keys + (counters.astype(np.uint64) + np.uint64(1)) * _GOLDEN
    return (mix(z) >> _SHIFTS[3]) * _TO_UNIT


def splitmix_int(x: int) -> int:
    """Python-int SplitMix64 finaliser, for the per-instance seed key."""
    m = (1 << 64) - 1
    x = (x + 0x9E3779B97F4A7C15) & m
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & m
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & m
    return x ^ (x >> 31)


# ----------------------------------------------------------------------------- grouping


def arange(n: int) -> np.ndarray:
    return np.arange(n, dtype=np.int64)


def order(group: np.ndarray, frac: np.ndarray) -> np.ndarray:
    """Stable order by (group, frac) for non-negative int groups and ``frac`` in [0, 1).

    One stable argsort of ``group << 31 | floor(frac * 2**31)``: several times cheaper than
    np.lexsort here (docs/benchmarks.md). Fractions equal in their top 31 bits keep their input
    order, which callers always give in row-local order, so results never depend on the rest of
    the batch.
    """
    key = (group << 31) | (frac * 2147483648.0).astype(np.int64)
    return key.argsort(kind="stable")


def group_bounds(sorted_ids: np.ndarray, groups: int) -> tuple[np.ndarray, np.ndarray]:
    """For non-decreasing ids in ``[0, groups)``: per element, the index of the first element
    of its group and the group's size (bincount is several times cheaper than searchsorted)."""
    counts = np.bincount(sorted_ids, minlength=groups)
    first = np.add.accumulate(counts) - counts
    return first.repeat(counts), counts.repeat(counts)


def group_first(sorted_ids: np.ndarray, groups: int) -> np.ndarray:
    """Per element of non-decreasing ids in ``[0, groups)``: index of its group's first one."""
    return group_bounds(sorted_ids, groups)[0]


# ----------------------------------------------------------------------------- batch arrays


@dataclass
class Spans:
    """Spans of a batch: row, start inside the row, length (int64 [N] each)."""

    row: np.ndarray
    start: np.ndarray
    length: np.ndarray


_SPAN_FIELDS = ("row", "start", "length")


def concat_spans(parts: list[Spans]) -> Spans:
    """The spans of ``parts`` one after another."""
    return Spans(*(np.concatenate([getattr(p, f) for p in parts]) for f in _SPAN_FIELDS))


@dataclass
class Flat:
    """The batch's windows concatenated, one eos after each (so no document crosses rows)."""

    tokens: np.ndarray  # int64 [F], F = sum(L + 1)
    offset: np.ndarray  # int64 [B] where each row starts in ``tokens``
    length: np.ndarray  # int64 [B] window lengths L
    eos_pos: np.ndarray  # int64 [E] eos positions in ``tokens`` (separators included)


@dataclass
class Runs:
    """Eos-free runs (documents) of a ``Flat``; every eos ends one run (int64 arrays)."""

    start: np.ndarray  # [D] flat position of each run
    length: np.ndarray  # [D] tokens in each run (0 between two eos)
    end_mass: np.ndarray  # [D] non-eos tokens of the batch up to each run's end
    first: np.ndarray  # [B] first run of each row
    stop: np.ndarray  # [B] one past the last run of each row
    mass_off: np.ndarray  # [B] non-eos tokens before each row
    mass: np.ndarray  # [B] non-eos tokens of each row


def runs_of(flat: Flat) -> Runs:
    eos = flat.eos_pos  # the batch ends with a separator, so the last run ends at eos[-1]
    start = np.concatenate((_ZERO, eos[:-1] + 1))
    length = eos - start
    first = eos.searchsorted(flat.offset)
    stop = eos.searchsorted(flat.offset + flat.length) + 1
    mass_off = flat.offset - first
    mass = flat.length - (stop - 1 - first)
    return Runs(start, length, np.add.accumulate(length), first, stop, mass_off, mass)
