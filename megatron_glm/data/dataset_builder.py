"""Train, valid and test datasets of windows from one or several corpora.

Every corpus is split by documents into contiguous train/valid/test ranges
(:func:`split_documents`, Megatron-LM's rule); each split is a
:class:`~megatron_glm.data.packed_dataset.PackedDataset`, or a
:class:`~megatron_glm.data.blended_dataset.BlendedDataset` across corpora. Megatron-core's
``blended_megatron_dataset_builder.py``. The split weights come parsed
(:func:`megatron_glm.config.parse_split`).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence

import numpy as np

from megatron_glm.data.blended_dataset import BlendedDataset
from megatron_glm.data.blending import normalize_weights
from megatron_glm.data.indexed import IndexedDataset
from megatron_glm.data.packed_dataset import PackedDataset
from megatron_glm.data.sample_index import CorpusArrays

__all__ = ["SampleDataset", "build_pretrain_datasets", "split_documents"]

logger = logging.getLogger(__name__)

_SPLIT_NAMES = ("train", "valid", "test")


SampleDataset = PackedDataset | BlendedDataset


def split_documents(num_documents: int, split: Sequence[float]) -> list[tuple[int, int]]:
    """Contiguous ``[start, end)`` document ranges for train, valid, test.

    ``split``: the three weights of :func:`megatron_glm.config.parse_split`. Megatron-LM's
    ``get_train_valid_test_split_``: boundaries are cumulative sums of
    ``round(w * num_documents)`` (Python's round-half-even) shifted so the last one is
    ``num_documents``. Megatron can produce a negative boundary when a zero weight precedes two
    halves rounded up (``"0,1,1"`` with 3 documents); here boundaries are clipped into
    ``[0, num_documents]`` and made non-decreasing, identical to Megatron wherever it is valid.
    """
    if num_documents < 0:
        raise ValueError(f"split_documents: num_documents = {num_documents} must be >= 0")
    weights = [float(w) for w in split]
    assert len(weights) == 3 and all(math.isfinite(w) and w >= 0 for w in weights), weights
    total = sum(weights)
    assert total > 0, weights
    bounds = [0]
    for w in weights:
        bounds.append(bounds[-1] + round(w / total * float(num_documents)))
    diff = bounds[-1] - num_documents
    bounds = [bounds[0]] + [b - diff for b in bounds[1:]]
    fixed = np.maximum.accumulate(np.clip(np.asarray(bounds), 0, num_documents))
    return [(int(fixed[k]), int(fixed[k + 1])) for k in range(3)]


def _split_dataset(
    corpora: list[IndexedDataset],
    ranges: list[tuple[int, int]],
    weights: list[float] | None,
    split_name: str,
    num_samples: int,
    *,
    window_length: int,
    seed: int,
    eos_id: int,
    cache_dir: str | None,
    vocab_size: int | None,
) -> SampleDataset | None:
    """The dataset of one split: a PackedDataset, a blend of several, or None if empty."""
    if num_samples == 0:
        return None
    live = [k for k, (a, b) in enumerate(ranges) if b > a]
    for k in sorted(set(range(len(corpora))) - set(live)):
        logger.warning("%s split: no documents in %s; left out", split_name, corpora[k].prefix)
    if not live:
        return None
    if len(live) == 1:
        w = [1.0]
    elif weights is None:
        w = [float(_split_tokens(corpora[k], ranges[k], eos_id)) for k in live]
    else:
        w = [weights[k] for k in live]
    w_norm = normalize_weights(w)
    parts = []
    for k, share in zip(live, w_norm, strict=True):
        # The blend is within quota, so corpus k serves at most ceil(n w_k) samples; +1 absorbs
        # floating-point rounding of n * w_k.
        need = num_samples if len(live) == 1 else math.ceil(num_samples * float(share)) + 1
        parts.append(
            PackedDataset(
                corpora[k],
                documents=ranges[k],
                window_length=window_length,
                num_samples=need,
                seed=seed,
                eos_id=eos_id,
                name=f"{split_name}:{os.path.basename(corpora[k].prefix)}",
                cache_dir=cache_dir,
                vocab_size=vocab_size,
            )
        )
    if len(parts) == 1:
        return parts[0]
    blend_dir = cache_dir or os.path.dirname(os.path.abspath(corpora[live[0]].prefix))
    return BlendedDataset(parts, list(w_norm), num_samples, seed, blend_dir)


def _split_tokens(indexed: IndexedDataset, documents: tuple[int, int], eos_id: int) -> int:
    """Packed tokens per epoch of a document range (the blending weight when none is given)."""
    docs = np.arange(documents[0], documents[1], dtype=np.int64)
    return int(CorpusArrays.of(indexed).geometry(docs, eos_id).packed.sum())


def build_pretrain_datasets(
    data_paths: Sequence[str],
    data_weights: Sequence[float] | None,
    split: Sequence[float],
    window_length: int,
    num_samples: tuple[int, int, int],
    seed: int,
    eos_id: int,
    cache_dir: str | None,
    vocab_size: int | None = None,
) -> tuple[SampleDataset | None, SampleDataset | None, SampleDataset | None]:
    """Train, valid and test datasets of windows from one or several indexed corpora.

    Every corpus is split by documents with ``split`` (three weights, as
    :func:`megatron_glm.config.parse_split` returns; ``split_documents``); each split is a
    PackedDataset, or a BlendedDataset across corpora weighted by ``data_weights`` (None: by the
    split's token counts). A split is None when it has no documents or 0 requested samples.
    ``vocab_size`` (the tokenizer's): every window served is checked against it (PackedDataset).
    """
    if not data_paths:
        raise ValueError("build_pretrain_datasets: data_paths is empty")
    if data_weights is not None and len(data_weights) != len(data_paths):
        raise ValueError(
            f"build_pretrain_datasets: {len(data_weights)} data_weights for "
            f"{len(data_paths)} data_paths"
        )
    if data_weights is not None:
        normalize_weights(data_weights)  # validates each weight
    if len(num_samples) != 3 or any(n < 0 for n in num_samples):
        raise ValueError(
            f"build_pretrain_datasets: num_samples {tuple(num_samples)} must be three counts >= 0"
        )
    corpora = [IndexedDataset(p) for p in data_paths]
    ranges = [split_documents(c.num_documents, split) for c in corpora]
    weights = None if data_weights is None else [float(w) for w in data_weights]
    out = [
        _split_dataset(
            corpora,
            [r[s] for r in ranges],
            weights,
            _SPLIT_NAMES[s],
            int(num_samples[s]),
            window_length=window_length,
            seed=seed,
            eos_id=eos_id,
            cache_dir=cache_dir,
            vocab_size=vocab_size,
        )
        for s in range(3)
    ]
    return out[0], out[1], out[2]
