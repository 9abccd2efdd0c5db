"""Apportionment of blended samples: which corpus serves each sample of a blend.

The requirement is *quota on every prefix*: after any first ``n`` samples, corpus ``i`` has served
``c_i(n)`` samples with ``|c_i(n) - n * w_i| < 1`` (equivalently ``floor(n w_i) <= c_i(n) <=
ceil(n w_i)``). That makes the mixture exact at every step of training, not only on average.

Why not Megatron-LM's rule. Megatron's ``build_blending_indices`` picks, at step ``t``, the corpus
with the largest deficit ``w_i * t - c_i``. That keeps two corpora within quota but not more: with
seven corpora of weights ~(0.755, 0.188, 0.046, 0.0097, 0.0008, 0.0002, ~0) its deviation reaches
1.19 (see ``tests/unit/test_blending.py``).

The rule used here is earliest-deadline-first scheduling, i.e. Balinski and Young's *quota method*
(1975), which provably stays within quota. Selection number ``k`` (0-based) of corpus ``i`` is a
unit job that must run in a step ``t`` (1-based) with

* ``t > k / w_i``: afterwards ``c_i(t) = k + 1``, and the upper quota needs ``k + 1 < t w_i + 1``;
* ``t < (k + 1) / w_i + 1``: before it ``c_i(t - 1) = k``, and the lower quota needs
  ``k > (t - 1) w_i - 1``.

Each step runs, among the corpora whose next job is *released* (``w_i t > c_i``), the one with the
earliest deadline ``(c_i + 1) / w_i`` (ties: lowest corpus index). A released corpus always exists
because the deficits sum to 1; a schedule within quota exists (Balinski-Young, Tijdeman's chairman
assignment theorem), and EDF is optimal for unit jobs, so EDF finds one.

Speed. The loop costs ~1-2.5 us per sample in Python; it runs once per blend and is cached. When
every weight is below ``1 / (m - 1)`` (always true for two corpora) the release condition can never
bind, so EDF equals the static merge of all jobs by deadline, which is one vectorised sort. Proof:
job ``(i, k)`` with deadline ``x = (k + 1) / w_i`` is preceded by at least ``ceil(w_j x) - 1 >=
w_j x - 1`` jobs of every other corpus ``j`` and by ``k`` of its own, so its step is ``t >= x -
(m - 1)``, which exceeds its release time ``k / w_i`` whenever ``1 / w_i > m - 1``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = ["Weights", "blending_indices", "normalize_weights"]

Weights = Sequence[float] | np.ndarray
"""Blending weights: any positive numbers, normalised to sum to 1."""

# The sorted fast path needs w_i * (m - 1) < 1 with room for floating-point error in the keys.
_FAST_PATH_SLACK = 1e-9
_MAX_DATASETS = np.iinfo(np.int16).max


def normalize_weights(weights: Weights) -> np.ndarray:
    """Weights as float64 summing to 1; ValueError naming the bad entry."""
    if len(weights) == 0:
        raise ValueError("blending weights: need at least one weight")
    if len(weights) > _MAX_DATASETS:
        raise ValueError(f"blending weights: at most {_MAX_DATASETS} datasets, got {len(weights)}")
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1:
        raise ValueError(f"blending weights: expected a flat list, got shape {w.shape}")
    for i, x in enumerate(w):
        if not (math.isfinite(x) and x > 0):
            raise ValueError(f"blending weights[{i}] = {weights[i]!r}: must be finite and > 0")
    return w / w.sum()


def _edf_loop(w: np.ndarray, n: int) -> np.ndarray:
    """Earliest-deadline-first over released corpora, one step per sample. Returns int16 [n]."""
    m = len(w)
    weights = [float(x) for x in w]
    inverse = [1.0 / x for x in weights]
    counts = [0] * m
    out = np.empty(n, dtype=np.int16)
    corpora = range(m)
    for t in range(1, n + 1):
        best, best_deadline = -1, 0.0
        for i in corpora:
            c = counts[i]
            if weights[i] * t > c:  # released: one more selection stays within upper quota
                deadline = (c + 1) * inverse[i]
                if best < 0 or deadline < best_deadline:
                    best, best_deadline = i, deadline
        counts[best] += 1
        out[t - 1] = best
    return out


def _edf_sorted(w: np.ndarray, n: int) -> np.ndarray:
    """EDF when no release can bind: merge every corpus's jobs by deadline. Returns int16 [n]."""
    inverse = 1.0 / w
    # Corpus i needs at most ceil(n w_i) jobs among the first n; +1 covers rounding in n * w_i.
    jobs = [np.arange(1, math.ceil(n * float(x)) + 2, dtype=np.float64) for x in w]
    deadlines = np.concatenate([k * inverse[i] for i, k in enumerate(jobs)])  # [J]
    corpus = np.concatenate([np.full(len(k), i, dtype=np.int16) for i, k in enumerate(jobs)])
    # Jobs are laid out corpus by corpus, so a stable sort breaks deadline ties by corpus index,
    # the same tie rule as the loop; keys are computed with the same float operations.
    order = np.argsort(deadlines, kind="stable")[:n]
    return corpus[order]


def blending_indices(weights: Weights, num_samples: int) -> tuple[np.ndarray, np.ndarray]:
    """Which corpus serves each blended sample, and which of that corpus's samples it is.

    Returns ``(dataset_index int16 [n], dataset_sample_index int64 [n])``: sample ``t`` of the blend
    is sample ``dataset_sample_index[t]`` of corpus ``dataset_index[t]``, and every prefix is within
    quota of the normalised ``weights`` (see the module docstring).
    """
    if num_samples < 0:
        raise ValueError(f"blending num_samples = {num_samples}: must be >= 0")
    w = normalize_weights(weights)
    m = len(w)
    if m == 1:
        dataset_index = np.zeros(num_samples, dtype=np.int16)
    elif float(w.max()) * (m - 1) < 1.0 - _FAST_PATH_SLACK:
        dataset_index = _edf_sorted(w, num_samples)
    else:
        dataset_index = _edf_loop(w, num_samples)
    dataset_sample_index = np.empty(num_samples, dtype=np.int64)
    for i in range(m):
        where = np.flatnonzero(dataset_index == i)
        dataset_sample_index[where] = np.arange(len(where), dtype=np.int64)
    return dataset_index, dataset_sample_index
