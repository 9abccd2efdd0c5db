"""Blended dataset: several packed datasets interleaved with exact per-prefix quotas.

The apportionment is :func:`megatron_glm.data.blending.blending_indices`; its index is cached
like a packed dataset's (:mod:`megatron_glm.data.index_cache`). Megatron-core's
``blended_dataset.py``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from megatron_glm.data.blending import blending_indices, normalize_weights
from megatron_glm.data.index_cache import FORMAT_VERSION, canonical_digest, load_or_build
from megatron_glm.data.packed_dataset import PackedDataset, Window

__all__ = ["BlendedDataset"]


class BlendedDataset:
    """Interleaves datasets so that every prefix of n samples has ``|c_i - n w_i| < 1``.

    The returned ``Window`` keeps its sub-dataset's epoch but takes the blend's sample index, so
    per-(epoch, index) seeding downstream never repeats across corpora. ``seed`` is accepted for
    symmetry with PackedDataset; the apportionment is deterministic and does not use it.
    ``cache_dir=None`` builds the (cheap) index in memory instead of caching it.
    """

    def __init__(
        self,
        datasets: Sequence[PackedDataset],
        weights: Sequence[float],
        num_samples: int,
        seed: int,
        cache_dir: str | None,
    ) -> None:
        if len(datasets) != len(weights):
            raise ValueError(f"BlendedDataset: {len(datasets)} datasets but {len(weights)} weights")
        if num_samples < 1:
            raise ValueError(f"BlendedDataset: num_samples = {num_samples} must be >= 1")
        self.datasets = list(datasets)
        self.weights = normalize_weights(weights)
        self.num_samples = int(num_samples)
        self.seed = int(seed)
        arrays, meta = self._load_index(cache_dir)
        self._dataset_index = arrays["dataset_index"]  # int16 [num_samples]
        self._sample_index = arrays["sample_index"]  # int64 [num_samples]
        self.counts: list[int] = [int(c) for c in meta["counts"]]
        """Samples drawn from each dataset."""
        for i, (ds, need) in enumerate(zip(self.datasets, self.counts, strict=True)):
            if len(ds) < need:
                raise ValueError(
                    f"BlendedDataset: dataset {i} ({getattr(ds, 'name', ds)!r}) has {len(ds)} "
                    f"samples, the blend needs {need}"
                )

    def _load_index(self, cache_dir: str | None) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """The blend's index arrays and meta, from the cache (built if absent) or in memory."""
        key = {
            "format": FORMAT_VERSION,
            "kind": "blend",
            "weights": [float(x) for x in self.weights],
            "num_samples": self.num_samples,
        }

        def build() -> tuple[dict[str, np.ndarray], dict[str, Any]]:
            index, sample = blending_indices(self.weights, self.num_samples)
            counts = np.bincount(index, minlength=len(self.weights))
            return {"dataset_index": index, "sample_index": sample}, {"counts": counts.tolist()}

        if cache_dir is None:
            self.built = True
            return build()
        entry = load_or_build(
            os.path.abspath(cache_dir),
            f"blend_{canonical_digest(key)[:24]}",
            key,
            ("dataset_index", "sample_index"),
            build,
            f"BlendedDataset of {len(self.datasets)}",
        )
        self.built = entry.built
        return entry.arrays, entry.meta

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> Window:
        n = self.num_samples
        j = int(i) + n if i < 0 else int(i)
        if not 0 <= j < n:
            raise IndexError(f"sample {i} out of range for {n} blended samples")
        ds = self.datasets[int(self._dataset_index[j])]
        window = ds[int(self._sample_index[j])]
        return dataclasses.replace(window, index=j)

    def dataset_index(self, i: int) -> int:
        """Which dataset serves blended sample ``i``."""
        return int(self._dataset_index[i])
