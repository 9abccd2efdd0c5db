"""Packed dataset: windows of ``window_length`` tokens cut from a shuffled stream of documents.

How documents become windows, and the index arrays that say where each window starts, are
described in :mod:`megatron_glm.data.sample_index`; the arrays are cached by
:mod:`megatron_glm.data.index_cache`. This module serves windows from them (Megatron-core's
``gpt_dataset.py``).

Sentence starts. Each window lists the offsets where a stored sequence (a sentence with
``--split-sentences``, else the whole document) starts inside it, plus offset 0 (the window edge
may cut a sentence: the fragment counts as one) and every document start. The appended eos belongs
to the document's last sentence. The sentence objective of blank infilling uses these boundaries.
"""

from __future__ import annotations

import bisect
import hashlib
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from megatron_glm.data.index_cache import (
    FORMAT_VERSION,
    canonical_digest,
    file_fingerprint,
    load_or_build,
)
from megatron_glm.data.indexed import IndexedDataset
from megatron_glm.data.sample_index import (
    CorpusArrays,
    DocumentGeometry,
    build_packed_indices,
    segment_ranges,
)

__all__ = ["PackedDataset", "Window"]


@dataclass(frozen=True, eq=False)
class Window:
    """One packed training window (``eq=False``: numpy fields make ``==`` ambiguous)."""

    tokens: np.ndarray
    """int64 [L'], L' <= window_length; only the last window of an epoch may be shorter."""
    sentence_starts: np.ndarray
    """int64 [K], sorted, unique offsets in [0, L') where a sentence (or fragment) starts; has 0."""
    epoch: int
    """Epoch of the packed dataset this window belongs to."""
    index: int
    """Global sample index, unique across epochs (and across a blend, see BlendedDataset)."""


class PackedDataset:
    """Map-style dataset of ``Window``s packed from a document range of one IndexedDataset.

    ``len()`` is ``num_samples``; epochs repeat as needed (:mod:`megatron_glm.data.sample_index`).
    Indices are read-only memory maps shared by all ranks; ``__getitem__`` gathers one window's
    slices of the token memmap in O(window) numpy work.

    With ``vocab_size``, every window served is checked to hold only ids in ``[0, vocab_size)``
    (a min and a max over the window); a bad one raises ValueError naming the ``.bin``, the
    document and the sample, where it would otherwise be an IndexError in the embedding (or,
    below the padded vocabulary, silently a padding row). The pre-launch
    :func:`megatron_glm.data.indexed.check_dataset` only samples corpora over 1 GiB.
    """

    def __init__(
        self,
        indexed: IndexedDataset,
        *,
        documents: tuple[int, int] | np.ndarray,
        window_length: int,
        num_samples: int,
        seed: int,
        eos_id: int,
        name: str,
        cache_dir: str | None = None,
        vocab_size: int | None = None,
    ) -> None:
        self.indexed = indexed
        self._corpus = CorpusArrays.of(indexed)
        self.name = name
        self.window_length = int(window_length)
        self.num_samples = int(num_samples)
        self.seed = int(seed)
        self.eos_id = int(eos_id)
        self.vocab_size = None if vocab_size is None else int(vocab_size)
        docs, doc_key = self._check_args(indexed, documents)
        prefix = os.path.abspath(indexed.prefix)
        self.cache_dir = os.path.abspath(cache_dir or os.path.dirname(prefix))
        key = self._cache_key(doc_key)
        stem = f"{os.path.basename(prefix)}_packed_{canonical_digest(key)[:24]}"

        def build() -> tuple[dict[str, np.ndarray], dict[str, Any]]:
            geometry = self._corpus.geometry(docs, self.eos_id)
            return build_packed_indices(
                geometry.packed, docs, self.window_length, self.num_samples, self.seed
            )

        entry = load_or_build(
            self.cache_dir,
            stem,
            key,
            ("doc_order", "sample_idx", "shuffle"),
            build,
            f"PackedDataset {name!r} ({indexed.prefix})",
        )
        self.built: bool = entry.built
        """Whether this instance built the cache (False: it was reused)."""
        self.cache_paths: dict[str, str] = entry.paths
        # Read-only base-class views of the cache memmaps (see CorpusArrays for why not memmap).
        self._doc_order = np.asarray(entry.arrays["doc_order"])  # [E * D]
        self._sample_idx = np.asarray(entry.arrays["sample_idx"])  # [E * (W + 1), 2]
        self._shuffle = np.asarray(entry.arrays["shuffle"])  # [num_samples]
        self.num_documents = len(docs)
        self.tokens_per_epoch: int = int(entry.meta["tokens_per_epoch"])
        self.windows_per_epoch: int = int(entry.meta["windows_per_epoch"])
        self.num_epochs: int = int(entry.meta["epochs"])

    def _cache_key(self, doc_key: Any) -> dict[str, Any]:
        """Everything that determines the index arrays (index_cache: the cache's identity)."""
        return {
            "format": FORMAT_VERSION,
            "kind": "packed",
            "prefix": os.path.realpath(os.path.abspath(self.indexed.prefix)),
            "idx": file_fingerprint(self.indexed.index_path),
            "bin": file_fingerprint(self.indexed.data_path),
            "documents": doc_key,
            "window_length": self.window_length,
            "num_samples": self.num_samples,
            "seed": self.seed,
            "eos_id": self.eos_id,
            "eos_rule": "append one eos unless the stored document ends with eos_id",
        }

    def _check_args(
        self, indexed: IndexedDataset, documents: tuple[int, int] | np.ndarray
    ) -> tuple[np.ndarray, Any]:
        """Validate the arguments; return the document ids (int64 [D]) and their cache-key form."""
        what = f"PackedDataset {self.name!r}"
        if self.window_length < 1:
            raise ValueError(f"{what}: window_length = {self.window_length} must be >= 1")
        if self.num_samples < 1:
            raise ValueError(f"{what}: num_samples = {self.num_samples} must be >= 1")
        if self.seed < 0:
            raise ValueError(f"{what}: seed = {self.seed} must be >= 0")
        total = indexed.num_documents
        if isinstance(documents, tuple):
            start, end = (int(x) for x in documents)
            if not 0 <= start < end <= total:
                raise ValueError(
                    f"{what}: documents [{start}, {end}) is empty or outside [0, {total}) "
                    f"of {indexed.prefix}"
                )
            return np.arange(start, end, dtype=np.int64), [start, end]
        docs = np.asarray(documents)
        if docs.ndim != 1 or len(docs) == 0 or not np.issubdtype(docs.dtype, np.integer):
            raise ValueError(f"{what}: documents must be a non-empty 1-D integer array")
        docs = docs.astype(np.int64)
        if docs.min() < 0 or docs.max() >= total:
            raise ValueError(
                f"{what}: document ids must lie in [0, {total}) of {indexed.prefix}, got "
                f"[{int(docs.min())}, {int(docs.max())}]"
            )
        if len(np.unique(docs)) != len(docs):
            raise ValueError(f"{what}: documents contains duplicate ids")
        digest = hashlib.sha256(docs.astype("<i8").tobytes()).hexdigest()
        return docs, {"count": len(docs), "sha256": digest}

    def __len__(self) -> int:
        return self.num_samples

    def document_order(self, epoch: int) -> np.ndarray:
        """Global document ids of ``epoch`` in packing order (int64 [D], read-only view)."""
        if not 0 <= epoch < self.num_epochs:
            raise IndexError(f"epoch {epoch} out of range for {self.num_epochs} epochs")
        d = self.num_documents
        return self._doc_order[epoch * d : (epoch + 1) * d]

    def __getitem__(self, i: int) -> Window:
        n = self.num_samples
        j = int(i) + n if i < 0 else int(i)
        if not 0 <= j < n:
            raise IndexError(f"sample {i} out of range for {n} samples of {self.name!r}")
        epoch = j // self.windows_per_epoch
        row = epoch * (self.windows_per_epoch + 1) + int(self._shuffle[j])
        (p0, o0), (p1, o1) = self._sample_idx[row : row + 2].tolist()
        tokens, starts = self._gather(p0, o0, p1, o1, j)
        return Window(tokens=tokens, sentence_starts=starts, epoch=epoch, index=j)

    def _gather(
        self, p0: int, o0: int, p1: int, o1: int, sample: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Tokens and sentence starts of the stream from (p0, o0) up to (p1, o1) exclusive."""
        docs = np.asarray(self._doc_order[p0 : p1 + 1])  # [P] documents the window touches
        g = self._corpus.geometry(docs, self.eos_id)
        a = np.zeros(len(docs), dtype=np.int64)  # [P] first packed offset taken from each
        a[0] = o0
        b = g.packed.copy()  # [P] one past the last
        b[-1] = o1
        length = b - a  # [P] (the last may be 0: the window ends at a document boundary)
        out_pos = np.cumsum(length) - length  # [P] where each piece starts in the window
        take = np.maximum(np.minimum(b, g.stored) - a, 0)  # [P] stored tokens in each piece
        tokens = np.full(int(length.sum()), self.eos_id, dtype=np.int64)  # [L']
        src = segment_ranges(g.start + a, take)
        dst = segment_ranges(out_pos, take)
        tokens[dst] = self._corpus.tokens[src]
        if self.vocab_size is not None:
            self._check_token_ids(tokens, docs, a, out_pos, sample)
        return tokens, self._sentence_starts(g, a, take, length, out_pos)

    def _check_token_ids(
        self, tokens: np.ndarray, docs: np.ndarray, a: np.ndarray, out_pos: np.ndarray, sample: int
    ) -> None:
        """Raise ValueError if an id outside ``[0, vocab_size)`` is in the window ``tokens``,
        naming the file, the document (and the token in it) and the sample."""
        v = self.vocab_size
        assert v is not None
        if int(tokens.max()) < v and int(tokens.min()) >= 0:
            return
        pos = int(np.argmax((tokens >= v) | (tokens < 0)))
        k = int(np.searchsorted(out_pos, pos, side="right")) - 1  # the piece holding it
        raise ValueError(
            f"{self.indexed.data_path}: token id {int(tokens[pos])} outside the vocabulary "
            f"[0, {v}) in document {int(docs[k])} (its token {int(a[k]) + pos - int(out_pos[k])}), "
            f"sample {sample} of {self.name!r}"
        )

    def _sentence_starts(
        self,
        g: DocumentGeometry,
        a: np.ndarray,
        take: np.ndarray,
        length: np.ndarray,
        out_pos: np.ndarray,
    ) -> np.ndarray:
        """Starts of stored sequences inside each piece, plus every piece start (doc or cut).

        Interior pieces are whole documents, so all their sequences count. Only the first and last
        piece may cut a document, possibly a huge one (a book of 10^5 sentences): their sequence
        ranges are narrowed by binary search (``bisect`` on the array reads ~log2(n) elements;
        ``np.searchsorted`` would copy all of ``pointers``, which the format's 34-byte header
        leaves misaligned). The final mask makes the result exact either way, and drops empty
        sequences at a document's end, whose start would otherwise land on the appended eos.
        """
        lo = g.start + a  # [P] stored token range [lo, hi) of each piece, as .bin offsets
        hi = lo + take
        pointers, itemsize = self._corpus.pointers, self._corpus.itemsize
        s_lo, s_hi = g.first_seq.copy(), g.end_seq.copy()  # [P] sequence ranges
        for k in {0, len(s_lo) - 1}:
            first, end = int(s_lo[k]), int(s_hi[k])
            s_lo[k] = bisect.bisect_left(pointers, int(lo[k]) * itemsize, first, end)
            s_hi[k] = bisect.bisect_left(pointers, int(hi[k]) * itemsize, int(s_lo[k]), end)
        count = s_hi - s_lo  # [P] candidate sequences of each piece
        seqs = segment_ranges(s_lo, count)
        offset = pointers[seqs].astype(np.int64) // itemsize - np.repeat(lo, count)  # in piece
        inside = (offset >= 0) & (offset < np.repeat(take, count))
        seq_pos = (offset + np.repeat(out_pos, count))[inside]
        return np.unique(np.concatenate([out_pos[length > 0], seq_pos]))

    def __repr__(self) -> str:
        return (
            f"PackedDataset({self.name!r}, documents={self.num_documents}, "
            f"window_length={self.window_length}, samples={self.num_samples}, "
            f"epochs={self.num_epochs}, tokens_per_epoch={self.tokens_per_epoch})"
        )
