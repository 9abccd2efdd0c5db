"""Blending: quota on every prefix, the cached BlendedDataset, and build_pretrain_datasets.

The quota property is checked directly from the output (cumulative counts of a one-hot matrix
against ``n * w``), independently of how the library computes it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from megatron_glm.config import parse_split
from megatron_glm.data.blended_dataset import BlendedDataset
from megatron_glm.data.blending import _edf_loop, _edf_sorted, blending_indices
from megatron_glm.data.dataset_builder import build_pretrain_datasets, split_documents
from megatron_glm.data.indexed import IndexedDataset, IndexedDatasetBuilder
from megatron_glm.data.packed_dataset import PackedDataset

EOS = 1

# Seven corpora on which Megatron-LM's "largest deficit" rule leaves quota (deviation 1.19).
MEGATRON_COUNTEREXAMPLE = [
    0.7551110849338071,
    0.000822355012227823,
    0.18801568719663483,
    6.979028550353421e-12,
    0.04612772112504133,
    0.00974971075210876,
    0.0001734409732009742,
]


def _max_deviation(weights: Sequence[float] | np.ndarray, index: np.ndarray) -> float:
    """max over prefixes n and datasets i of |count_i(n) - n * w_i|."""
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    onehot = np.zeros((len(index), len(w)))
    onehot[np.arange(len(index)), index] = 1
    counts = np.cumsum(onehot, axis=0)  # [n, m] counts after each prefix
    n = np.arange(1, len(index) + 1, dtype=np.float64)[:, None]
    return float(np.abs(counts - n * w[None]).max())


def _megatron_greedy(weights: list[float], n: int) -> np.ndarray:
    """Megatron-LM's build_blending_indices (largest error first), restated."""
    w = np.asarray(weights) / np.sum(weights)
    counts = np.zeros(len(w))
    out = np.empty(n, dtype=np.int64)
    for t in range(n):
        i = int(np.argmax(w * max(t, 1) - counts))
        counts[i] += 1
        out[t] = i
    return out


def _weight_cases() -> list[list[float]]:
    rng = np.random.default_rng(0)
    cases: list[list[float]] = [[1.0], [1, 1], [0.3, 0.7], [1, 2, 3], [0.9, 0.05, 0.05]]
    cases.append(MEGATRON_COUNTEREXAMPLE)
    for m in (2, 3, 4, 6, 8):
        for concentration in (0.2, 1.0, 10.0):
            cases.append(rng.dirichlet(np.full(m, concentration)).tolist())
    return [[max(x, 1e-12) for x in c] for c in cases]


@pytest.mark.parametrize("weights", _weight_cases())
def test_quota_on_every_prefix(weights: list[float]) -> None:
    n = 2000
    index, sample = blending_indices(weights, n)
    assert index.shape == (n,) and sample.shape == (n,)
    assert _max_deviation(weights, index) < 1.0
    counts = np.zeros(len(weights), dtype=np.int64)  # sample index = running count per dataset
    for t in range(n):
        assert sample[t] == counts[index[t]]
        counts[index[t]] += 1


def test_megatron_rule_would_break_quota() -> None:
    """Why the EDF rule: the reference greedy leaves quota where ours does not."""
    n = 2000
    assert _max_deviation(MEGATRON_COUNTEREXAMPLE, _megatron_greedy(MEGATRON_COUNTEREXAMPLE, n)) > 1
    assert (
        _max_deviation(MEGATRON_COUNTEREXAMPLE, blending_indices(MEGATRON_COUNTEREXAMPLE, n)[0]) < 1
    )


@pytest.mark.parametrize("weights", [[0.3, 0.7], [0.5, 0.5], [0.2, 0.3, 0.45], [0.25] * 4])
def test_sorted_fast_path_equals_loop(weights: list[float]) -> None:
    w = np.asarray(weights) / np.sum(weights)
    assert w.max() * (len(w) - 1) < 1  # the fast path's precondition
    np.testing.assert_array_equal(_edf_sorted(w, 5000), _edf_loop(w, 5000))


def test_large_two_way_blend_is_vectorised() -> None:
    index, _ = blending_indices([0.37, 0.63], 2_000_000)  # the loop would take seconds
    counts = np.bincount(index)
    assert abs(counts[0] - 0.37 * 2_000_000) < 1


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        ([], "need at least one weight"),
        ([1, 0], r"weights\[1\] = 0: must be finite and > 0"),
        ([1, float("inf")], r"weights\[1\] = inf: must be finite and > 0"),
        ([-1], r"weights\[0\] = -1: must be finite and > 0"),
    ],
)
def test_bad_weights(weights: list[float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        blending_indices(weights, 10)


# ----------------------------------------------------------------------------- datasets


def _write_corpus(prefix: Path, num_docs: int, seed: int, low: int) -> IndexedDataset:
    """Documents of 1-4 sentences whose tokens lie in [low, low + 40): corpora are told apart."""
    rng = np.random.default_rng(seed)
    with IndexedDatasetBuilder(prefix, dtype=np.uint16) as builder:
        for _ in range(num_docs):
            sentences = [
                rng.integers(low, low + 40, int(rng.integers(1, 10)))
                for _ in range(int(rng.integers(1, 5)))
            ]
            builder.add_document(sentences)
    return IndexedDataset(prefix)


def _corpus_of(window_tokens: np.ndarray) -> set[int]:
    content = window_tokens[window_tokens != EOS]
    return {int(t) // 100 for t in content}


@pytest.fixture()
def two_corpora(tmp_path: Path) -> tuple[IndexedDataset, IndexedDataset]:
    return (
        _write_corpus(tmp_path / "a", 60, 0, 100),
        _write_corpus(tmp_path / "b", 30, 1, 200),
    )


def _packed(indexed: IndexedDataset, num_samples: int) -> PackedDataset:
    return PackedDataset(
        indexed,
        documents=(0, indexed.num_documents),
        window_length=8,
        num_samples=num_samples,
        seed=3,
        eos_id=EOS,
        name=str(indexed.prefix),
    )


def test_blended_dataset(two_corpora, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    a, b = two_corpora
    n = 300
    parts = [_packed(a, 200), _packed(b, 100)]
    blend = BlendedDataset(parts, [2.0, 1.0], n, seed=0, cache_dir=str(tmp_path / "cache"))
    assert blend.built and len(blend) == n
    assert blend.counts == [200, 100]
    seen = [0, 0]
    for i in range(n):
        w = blend[i]
        k = blend.dataset_index(i)
        expected = parts[k][seen[k]]
        assert w.index == i and w.epoch == expected.epoch
        np.testing.assert_array_equal(w.tokens, expected.tokens)
        np.testing.assert_array_equal(w.sentence_starts, expected.sentence_starts)
        assert _corpus_of(w.tokens) <= {k + 1}
        seen[k] += 1
    assert _max_deviation([2, 1], np.array([blend.dataset_index(i) for i in range(n)])) < 1
    caplog.set_level(logging.INFO, logger="megatron_glm.data.index_cache")
    again = BlendedDataset(parts, [2.0, 1.0], n, seed=0, cache_dir=str(tmp_path / "cache"))
    assert not again.built and "reusing cached indices" in caplog.text
    assert not again._dataset_index.flags.writeable
    other = BlendedDataset(parts, [1.0, 1.0], 200, seed=0, cache_dir=str(tmp_path / "cache"))
    assert other.built


def test_blend_needs_enough_samples(two_corpora) -> None:
    a, b = two_corpora
    parts = [_packed(a, 10), _packed(b, 100)]
    with pytest.raises(ValueError, match=r"dataset 0 \('.*a'\) has 10 samples, the blend needs 50"):
        BlendedDataset(parts, [1.0, 1.0], 100, seed=0, cache_dir=None)
    with pytest.raises(ValueError, match="2 datasets but 1 weights"):
        BlendedDataset(parts, [1.0], 100, seed=0, cache_dir=None)


def test_build_pretrain_datasets_single_corpus(two_corpora) -> None:
    a, _ = two_corpora
    train, valid, test = build_pretrain_datasets(
        [a.prefix], None, parse_split("8,2,0"), 8, (50, 10, 10), seed=3, eos_id=EOS, cache_dir=None
    )
    assert isinstance(train, PackedDataset) and isinstance(valid, PackedDataset)
    assert test is None  # no test documents
    (t0, t1), (v0, v1), _ = split_documents(a.num_documents, parse_split("8,2,0"))
    assert sorted(train.document_order(0).tolist()) == list(range(t0, t1))
    assert sorted(valid.document_order(0).tolist()) == list(range(v0, v1))
    assert len(train) == 50 and len(valid) == 10
    none = build_pretrain_datasets(
        [a.prefix], None, parse_split("8,2,0"), 8, (5, 0, 0), 3, EOS, None
    )
    assert none[1] is None and none[2] is None


def test_build_pretrain_datasets_blend(two_corpora, tmp_path: Path) -> None:
    a, b = two_corpora
    cache = str(tmp_path / "cache")
    train, valid, _ = build_pretrain_datasets(
        [a.prefix, b.prefix],
        None,
        parse_split("9,1"),
        8,
        (400, 40, 0),
        seed=3,
        eos_id=EOS,
        cache_dir=cache,
    )
    assert isinstance(train, BlendedDataset) and len(train) == 400
    token_weights = [ds.tokens_per_epoch for ds in train.datasets]
    assert _max_deviation(token_weights, train._dataset_index) < 1  # weights None: by tokens
    for i in range(0, 400, 7):
        assert _corpus_of(train[i].tokens) <= {train.dataset_index(i) + 1}
    assert isinstance(valid, BlendedDataset)
    weighted, _, _ = build_pretrain_datasets(
        [a.prefix, b.prefix], [1.0, 3.0], parse_split("9,1"), 8, (400, 0, 0), 3, EOS, cache
    )
    assert isinstance(weighted, BlendedDataset)
    assert weighted.counts == [100, 300]
    with pytest.raises(ValueError, match="1 data_weights for 2 data_paths"):
        build_pretrain_datasets(
            [a.prefix, b.prefix], [1.0], parse_split("9,1"), 8, (4, 0, 0), 3, EOS, cache
        )
