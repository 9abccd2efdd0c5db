"""Sample index of a packed dataset: where each window of packed documents starts.

Packing. Each epoch shuffles the split's documents (seeded by ``(seed, epoch)``) and concatenates
them into one token stream in which every document ends with eos: a document already ending with
``eos_id`` (preprocessed with ``--append-eod``) gets nothing, any other gets one eos *logically*
appended (it is not stored; the dataset writes it when it gathers a window). The stream is cut
into consecutive windows of ``window_length`` tokens; a long document simply continues in the
next window, and the last window of an epoch is shorter instead of being dropped or borrowing
from the next epoch, so every token of the split appears exactly once per epoch. Epochs repeat
until ``num_samples`` windows exist; the order of windows inside an epoch is shuffled too (seeded
by ``(seed, epoch)``), so a final partial epoch is a random subset of that epoch's windows.

Indices (Megatron-LM's three arrays, built per epoch with numpy, no per-document Python loop;
Megatron-core builds them in ``gpt_dataset.py`` and ``helpers.cpp``):

``doc_order``  int64 [E * D]        global document ids, epoch after epoch (D = split size)
``sample_idx`` int64 [E * (W+1), 2]  window start as (position in doc_order, token offset in that
                                    document); each epoch has W windows plus a sentinel row for its
                                    end, so a window ends where the next row starts
``shuffle``    int64 [num_samples]  sample i -> window number within epoch ``i // W``
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from megatron_glm.data.indexed import IndexedDataset

__all__ = ["CorpusArrays", "DocumentGeometry", "build_packed_indices", "segment_ranges"]

_RNG_DOCUMENTS, _RNG_WINDOWS = 0, 1  # purposes mixed into the per-epoch seed


@dataclass(frozen=True)
class DocumentGeometry:
    """Where documents lie in ``.bin`` and how long they are in the packed stream."""

    first_seq: np.ndarray  # int64 [P] first sequence of each document
    end_seq: np.ndarray  # int64 [P] one past its last sequence
    start: np.ndarray  # int64 [P] token offset in .bin
    stored: np.ndarray  # int64 [P] stored tokens
    packed: np.ndarray  # int64 [P] tokens in the stream: stored + 1 unless it ends with eos


@dataclass(frozen=True)
class CorpusArrays:
    """Plain-ndarray views of an IndexedDataset's maps.

    ``np.memmap`` routes every indexing result and ufunc through Python-level hooks, a large
    share of the dataset's ``__getitem__`` (docs/benchmarks.md); a base-class view of the same
    memory (``np.asarray``) does not.
    """

    doc_idx: np.ndarray  # int64 [D + 1] first sequence of each document
    pointers: np.ndarray  # int64 [N] byte offset of each sequence in .bin
    tokens: np.ndarray  # [T] every token of .bin
    itemsize: int

    @classmethod
    def of(cls, indexed: IndexedDataset) -> CorpusArrays:
        return cls(
            np.asarray(indexed.doc_idx),
            np.asarray(indexed.pointers),
            np.asarray(indexed.tokens),
            np.dtype(indexed.dtype).itemsize,
        )

    def sequence_offsets(self, seqs: np.ndarray) -> np.ndarray:
        """Token offset where each sequence starts; ``seq == N`` maps to the end of the data.

        Relies on the format's contiguity (pointers are cumulative sizes), which IndexedDataset
        validates on open.
        """
        n = len(self.pointers)
        if n == 0:
            return np.zeros(seqs.shape, dtype=np.int64)
        inside = self.pointers[np.minimum(seqs, n - 1)].astype(np.int64) // self.itemsize
        return np.where(seqs < n, inside, len(self.tokens))

    def geometry(self, docs: np.ndarray, eos_id: int) -> DocumentGeometry:
        first = self.doc_idx[docs].astype(np.int64)  # [P]
        end = self.doc_idx[docs + 1].astype(np.int64)  # [P]
        start = self.sequence_offsets(first)
        stored = self.sequence_offsets(end) - start
        nonempty = stored > 0
        ends_with_eos = np.zeros(len(docs), dtype=bool)
        ends_with_eos[nonempty] = self.tokens[(start + stored - 1)[nonempty]] == eos_id
        packed = stored + (~ends_with_eos).astype(np.int64)
        return DocumentGeometry(first, end, start, stored, packed)


def segment_ranges(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Concatenation of ``arange(s, s + c)`` for each (s, c), vectorised. int64 [sum(counts)]."""
    total = int(counts.sum())
    within = np.arange(total, dtype=np.int64) - np.repeat(np.cumsum(counts) - counts, counts)
    return np.repeat(starts, counts) + within


def _epoch_rng(seed: int, epoch: int, purpose: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, epoch, purpose]))


def build_packed_indices(
    packed: np.ndarray, docs: np.ndarray, window_length: int, num_samples: int, seed: int
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The three index arrays (module docstring) from per-document packed lengths.

    One iteration per epoch; everything inside is a vectorised numpy pass over documents or
    windows. ``packed >= 1`` for every document (at least its eos), so the stream's cumulative
    lengths are strictly increasing and ``searchsorted`` maps a token position to one document.
    """
    n_docs = len(docs)
    tokens_per_epoch = int(packed.sum())
    windows = -(-tokens_per_epoch // window_length)  # W
    epochs = -(-num_samples // windows)  # E
    doc_order = np.empty(epochs * n_docs, dtype=np.int64)  # [E * D]
    sample_idx = np.empty((epochs, windows + 1, 2), dtype=np.int64)  # [E, W + 1, 2]
    shuffle = np.empty(num_samples, dtype=np.int64)  # [num_samples]
    window_starts = np.arange(windows, dtype=np.int64) * window_length  # [W]
    for e in range(epochs):
        perm = _epoch_rng(seed, e, _RNG_DOCUMENTS).permutation(n_docs)  # [D]
        doc_order[e * n_docs : (e + 1) * n_docs] = docs[perm]
        lengths = packed[perm]  # [D]
        ends = np.cumsum(lengths)  # [D] stream offset one past each document
        pos = np.searchsorted(ends, window_starts, side="right")  # [W]
        sample_idx[e, :windows, 0] = e * n_docs + pos
        sample_idx[e, :windows, 1] = window_starts - (ends[pos] - lengths[pos])
        sample_idx[e, windows] = (e * n_docs + n_docs - 1, lengths[-1])  # end of the epoch
        take = min(windows, num_samples - e * windows)
        order = _epoch_rng(seed, e, _RNG_WINDOWS).permutation(windows)
        shuffle[e * windows : e * windows + take] = order[:take]
    arrays = {
        "doc_order": doc_order,
        "sample_idx": sample_idx.reshape(-1, 2),
        "shuffle": shuffle,
    }
    meta = {"tokens_per_epoch": tokens_per_epoch, "windows_per_epoch": windows, "epochs": epochs}
    return arrays, meta
