"""Pretraining samples: document splits, packing into windows, cached indices, blending.

Packing. Each epoch shuffles the split's documents (seeded by ``(seed, epoch)``) and concatenates
them into one token stream in which every document ends with eos: a document already ending with
``eos_id`` (preprocessed with ``--append-eod``) gets nothing, any other gets one eos *logically*
appended (it is not stored; ``__getitem__`` writes it). The stream is cut into consecutive windows
of ``window_length`` tokens; a long document simply continues in the next window, and the last
window of an epoch is shorter instead of being dropped or borrowing from the next epoch, so every
token of the split appears exactly once per epoch. Epochs repeat until ``num_samples`` windows
exist; the order of windows inside an epoch is shuffled too (seeded by ``(seed, epoch)``), so a
final partial epoch is a random subset of that epoch's windows.

Sentence starts. Each window lists the offsets where a stored sequence (a sentence with
``--split-sentences``, else the whole document) starts inside it, plus offset 0 (the window edge
may cut a sentence: the fragment counts as one) and every document start. The appended eos belongs
to the document's last sentence. The sentence objective of blank infilling uses these boundaries.

Indices (Megatron-LM's three arrays, built per epoch with numpy, no per-document Python loop):

``doc_order``  int64 [E * D]        global document ids, epoch after epoch (D = split size)
``sample_idx`` int64 [E * (W+1), 2]  window start as (position in doc_order, token offset in that
                                    document); each epoch has W windows plus a sentinel row for its
                                    end, so a window ends where the next row starts
``shuffle``    int64 [num_samples]  sample i -> window number within epoch ``i // W``

They are cached as ``.npy`` next to the data (or under ``cache_dir``) in files named by a sha256 of
a canonical JSON of everything that determines them (``_packed_key``), built by exactly one process
under an ``fcntl.flock`` and published by atomic rename, then memory-mapped read-only by all ranks.
A ``.json`` with the full key is written last: it is the "complete" marker and guards against ever
loading a cache built for other parameters. Across nodes on a shared filesystem without working
flock, two builders may race, but both write identical files by atomic rename, so the result is
still correct.

Blending (``BlendedDataset``) interleaves several packed datasets with exact per-prefix quotas
(``megatron_glm.data.blending``), its index cached the same way.
"""

from __future__ import annotations

import bisect
import dataclasses
import fcntl
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from megatron_glm.data.blending import blending_indices, normalize_weights
from megatron_glm.data.indexed import IndexedDataset

__all__ = [
    "FORMAT_VERSION",
    "BlendedDataset",
    "PackedDataset",
    "Window",
    "build_pretrain_datasets",
    "parse_split",
    "split_documents",
]

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
"""Bump whenever the meaning or layout of any cached array changes: old caches are then ignored."""

_SPLIT_NAMES = ("train", "valid", "test")
_FINGERPRINT_BYTES = 1 << 20  # head and tail of the .idx hashed into the cache key
_RNG_DOCUMENTS, _RNG_WINDOWS = 0, 1  # purposes mixed into the per-epoch seed


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


# ----------------------------------------------------------------------------- splits


def parse_split(split: str) -> list[float]:
    """Split weights from ``"969,30,1"`` (or ``"969/30/1"``), padded with zeros to three."""
    hint = "expected 1-3 non-negative numbers separated by ',' or '/' with a positive sum"
    sep = "," if "," in split else "/"
    parts = [p.strip() for p in split.split(sep)]
    if len(parts) > 3:
        raise ValueError(f"split {split!r}: {len(parts)} weights, {hint}, e.g. '969,30,1'")
    weights = []
    for p in parts:
        try:
            x = float(p)
        except ValueError:
            raise ValueError(f"split {split!r}: {p!r} is not a number; {hint}") from None
        if not (math.isfinite(x) and x >= 0):
            raise ValueError(f"split {split!r}: weight {p!r} is not finite and >= 0; {hint}")
        weights.append(x)
    if sum(weights) <= 0:
        raise ValueError(f"split {split!r}: weights sum to 0; {hint}")
    return weights + [0.0] * (3 - len(weights))


def split_documents(num_documents: int, split: str) -> list[tuple[int, int]]:
    """Contiguous ``[start, end)`` document ranges for train, valid, test.

    Megatron-LM's ``get_train_valid_test_split_``: boundaries are cumulative sums of
    ``round(w * num_documents)`` (Python's round-half-even) shifted so the last one is
    ``num_documents``. Megatron can produce a negative boundary when a zero weight precedes two
    halves rounded up (``"0,1,1"`` with 3 documents); here boundaries are clipped into
    ``[0, num_documents]`` and made non-decreasing, identical to Megatron wherever it is valid.
    """
    if num_documents < 0:
        raise ValueError(f"split_documents: num_documents = {num_documents} must be >= 0")
    weights = parse_split(split)
    total = sum(weights)
    bounds = [0]
    for w in weights:
        bounds.append(bounds[-1] + round(w / total * float(num_documents)))
    diff = bounds[-1] - num_documents
    bounds = [bounds[0]] + [b - diff for b in bounds[1:]]
    fixed = np.maximum.accumulate(np.clip(np.asarray(bounds), 0, num_documents))
    return [(int(fixed[k]), int(fixed[k + 1])) for k in range(3)]


# ----------------------------------------------------------------------------- cache


def _canonical_digest(key: dict[str, Any]) -> str:
    text = json.dumps(key, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def _file_fingerprint(path: str) -> dict[str, Any]:
    """Identity of a data file: size, mtime and a hash of its head and tail.

    Hashing a multi-GB ``.idx`` on every start would cost seconds per rank; size + mtime catch
    rewrites, and the head/tail hash catches a same-size rewrite within one mtime tick.
    """
    st = os.stat(path)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(_FINGERPRINT_BYTES))
        if st.st_size > 2 * _FINGERPRINT_BYTES:
            f.seek(st.st_size - _FINGERPRINT_BYTES)
        h.update(f.read(_FINGERPRINT_BYTES))
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256_head_tail": h.hexdigest()}


def _atomic_save(path: str, array: np.ndarray) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        np.save(f, np.ascontiguousarray(array))
    os.replace(tmp, path)


def _atomic_write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


@dataclass(frozen=True)
class _CacheEntry:
    arrays: dict[str, np.ndarray]  # read-only memmaps
    meta: dict[str, Any]  # scalars stored with the arrays
    built: bool  # whether this process built them
    paths: dict[str, str]  # array name -> .npy path, plus "meta" and "lock"


def _cache_paths(cache_dir: str, stem: str, names: Sequence[str]) -> dict[str, str]:
    paths = {n: os.path.join(cache_dir, f"{stem}_{n}.npy") for n in names}
    paths["meta"] = os.path.join(cache_dir, f"{stem}.json")
    paths["lock"] = os.path.join(cache_dir, f"{stem}.lock")
    return paths


def _try_load(paths: dict[str, str], key: dict[str, Any]) -> _CacheEntry | None:
    """The cached arrays if complete and built for ``key``; None (with a warning if bad) if not."""
    if not os.path.exists(paths["meta"]):
        return None
    try:
        with open(paths["meta"]) as f:
            record = json.load(f)
        if record.get("key") != key:
            logger.warning("index cache %s was built for another key; rebuilding", paths["meta"])
            return None
        arrays = {}
        for name, spec in record["arrays"].items():
            arr = np.load(paths[name], mmap_mode="r")
            if list(arr.shape) != spec["shape"] or arr.dtype.str != spec["dtype"]:
                raise ValueError(f"{paths[name]}: shape {arr.shape} dtype {arr.dtype}, want {spec}")
            arrays[name] = arr
    except (OSError, ValueError, KeyError) as e:
        logger.warning("index cache %s unreadable (%s); rebuilding", paths["meta"], e)
        return None
    return _CacheEntry(arrays, record["meta"], False, paths)


def _load_or_build(
    cache_dir: str,
    stem: str,
    key: dict[str, Any],
    names: Sequence[str],
    build: Callable[[], tuple[dict[str, np.ndarray], dict[str, Any]]],
    what: str,
) -> _CacheEntry:
    """Memory-map the cached arrays for ``key``, building them first if no process has yet.

    The fast path takes no lock. Otherwise an exclusive flock serialises builders; whoever gets it
    second finds the finished cache and only maps it. Arrays are published by atomic rename and
    the meta file last, so a reader never sees a half-written cache.
    """
    try:
        os.makedirs(cache_dir, exist_ok=True)
    except OSError as e:
        raise ValueError(
            f"index cache directory {cache_dir!r} cannot be created ({e}); set data.cache_dir"
        ) from e
    if not os.access(cache_dir, os.W_OK):
        raise ValueError(f"index cache directory {cache_dir!r} is not writable; set data.cache_dir")
    paths = _cache_paths(cache_dir, stem, names)
    t0 = time.perf_counter()
    entry = _try_load(paths, key)
    if entry is None:
        with open(paths["lock"], "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                entry = _try_load(paths, key)
                if entry is None:
                    _build_and_publish(paths, key, names, build, what)
                    entry = _try_load(paths, key)
                    assert entry is not None, f"{paths['meta']}: cache unreadable right after build"
                    entry = dataclasses.replace(entry, built=True)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
    if not entry.built:
        logger.info(
            "%s: reusing cached indices %s (%.3f s)", what, paths["meta"], time.perf_counter() - t0
        )
    return entry


def _build_and_publish(
    paths: dict[str, str],
    key: dict[str, Any],
    names: Sequence[str],
    build: Callable[[], tuple[dict[str, np.ndarray], dict[str, Any]]],
    what: str,
) -> None:
    logger.info("%s: building indices -> %s", what, paths["meta"])
    t0 = time.perf_counter()
    arrays, meta = build()
    assert sorted(arrays) == sorted(names), f"built {sorted(arrays)}, expected {sorted(names)}"
    for name in names:
        _atomic_save(paths[name], arrays[name])
    specs = {n: {"shape": list(a.shape), "dtype": a.dtype.str} for n, a in arrays.items()}
    record = {"key": key, "meta": meta, "arrays": specs}
    _atomic_write_text(paths["meta"], json.dumps(record, indent=1, sort_keys=True))
    logger.info("%s: built indices in %.3f s", what, time.perf_counter() - t0)


# ----------------------------------------------------------------------------- documents


@dataclass(frozen=True)
class _DocumentGeometry:
    """Where documents lie in ``.bin`` and how long they are in the packed stream."""

    first_seq: np.ndarray  # int64 [P] first sequence of each document
    end_seq: np.ndarray  # int64 [P] one past its last sequence
    start: np.ndarray  # int64 [P] token offset in .bin
    stored: np.ndarray  # int64 [P] stored tokens
    packed: np.ndarray  # int64 [P] tokens in the stream: stored + 1 unless it ends with eos


@dataclass(frozen=True)
class _CorpusArrays:
    """Plain-ndarray views of an IndexedDataset's maps.

    ``np.memmap`` routes every indexing result and ufunc through Python-level hooks, which tripled
    the cost of ``__getitem__``; a base-class view of the same memory (``np.asarray``) does not.
    """

    doc_idx: np.ndarray  # int64 [D + 1] first sequence of each document
    pointers: np.ndarray  # int64 [N] byte offset of each sequence in .bin
    tokens: np.ndarray  # [T] every token of .bin
    itemsize: int

    @classmethod
    def of(cls, indexed: IndexedDataset) -> _CorpusArrays:
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

    def geometry(self, docs: np.ndarray, eos_id: int) -> _DocumentGeometry:
        first = self.doc_idx[docs].astype(np.int64)  # [P]
        end = self.doc_idx[docs + 1].astype(np.int64)  # [P]
        start = self.sequence_offsets(first)
        stored = self.sequence_offsets(end) - start
        nonempty = stored > 0
        ends_with_eos = np.zeros(len(docs), dtype=bool)
        ends_with_eos[nonempty] = self.tokens[(start + stored - 1)[nonempty]] == eos_id
        packed = stored + (~ends_with_eos).astype(np.int64)
        return _DocumentGeometry(first, end, start, stored, packed)


def _segment_ranges(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Concatenation of ``arange(s, s + c)`` for each (s, c), vectorised. int64 [sum(counts)]."""
    total = int(counts.sum())
    within = np.arange(total, dtype=np.int64) - np.repeat(np.cumsum(counts) - counts, counts)
    return np.repeat(starts, counts) + within


def _epoch_rng(seed: int, epoch: int, purpose: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, epoch, purpose]))


def _build_packed_indices(
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


# ----------------------------------------------------------------------------- packed


class PackedDataset:
    """Map-style dataset of ``Window``s packed from a document range of one IndexedDataset.

    ``len()`` is ``num_samples``; epochs repeat as needed (see the module docstring). Indices are
    read-only memory maps shared by all ranks; ``__getitem__`` gathers one window's slices of the
    token memmap in O(window) numpy work.

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
        self._corpus = _CorpusArrays.of(indexed)
        self.name = name
        self.window_length = int(window_length)
        self.num_samples = int(num_samples)
        self.seed = int(seed)
        self.eos_id = int(eos_id)
        self.vocab_size = None if vocab_size is None else int(vocab_size)
        docs, doc_key = self._check_args(indexed, documents)
        prefix = os.path.abspath(indexed.prefix)
        self.cache_dir = os.path.abspath(cache_dir or os.path.dirname(prefix))
        key = {
            "format": FORMAT_VERSION,
            "kind": "packed",
            "prefix": os.path.realpath(prefix),
            "idx": _file_fingerprint(indexed.index_path),
            "bin": _file_fingerprint(indexed.data_path),
            "documents": doc_key,
            "window_length": self.window_length,
            "num_samples": self.num_samples,
            "seed": self.seed,
            "eos_id": self.eos_id,
            "eos_rule": "append one eos unless the stored document ends with eos_id",
        }
        stem = f"{os.path.basename(prefix)}_packed_{_canonical_digest(key)[:24]}"

        def build() -> tuple[dict[str, np.ndarray], dict[str, Any]]:
            geometry = self._corpus.geometry(docs, self.eos_id)
            return _build_packed_indices(
                geometry.packed, docs, self.window_length, self.num_samples, self.seed
            )

        entry = _load_or_build(
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
        # Read-only base-class views of the cache memmaps (see _CorpusArrays for why not memmap).
        self._doc_order = np.asarray(entry.arrays["doc_order"])  # [E * D]
        self._sample_idx = np.asarray(entry.arrays["sample_idx"])  # [E * (W + 1), 2]
        self._shuffle = np.asarray(entry.arrays["shuffle"])  # [num_samples]
        self.num_documents = len(docs)
        self.tokens_per_epoch: int = int(entry.meta["tokens_per_epoch"])
        self.windows_per_epoch: int = int(entry.meta["windows_per_epoch"])
        self.num_epochs: int = int(entry.meta["epochs"])

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
        src = _segment_ranges(g.start + a, take)
        dst = _segment_ranges(out_pos, take)
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
        g: _DocumentGeometry,
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
        seqs = _segment_ranges(s_lo, count)
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


# ----------------------------------------------------------------------------- blended


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
            arrays, meta = build()
            self.built = True
        else:
            entry = _load_or_build(
                os.path.abspath(cache_dir),
                f"blend_{_canonical_digest(key)[:24]}",
                key,
                ("dataset_index", "sample_index"),
                build,
                f"BlendedDataset of {len(datasets)}",
            )
            arrays, meta, self.built = entry.arrays, entry.meta, entry.built
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


# ----------------------------------------------------------------------------- builder


SampleDataset = PackedDataset | BlendedDataset


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
    return int(_CorpusArrays.of(indexed).geometry(docs, eos_id).packed.sum())


def build_pretrain_datasets(
    data_paths: Sequence[str],
    data_weights: Sequence[float] | None,
    split: str,
    window_length: int,
    num_samples: tuple[int, int, int],
    seed: int,
    eos_id: int,
    cache_dir: str | None,
    vocab_size: int | None = None,
) -> tuple[SampleDataset | None, SampleDataset | None, SampleDataset | None]:
    """Train, valid and test datasets of windows from one or several indexed corpora.

    Every corpus is split by documents with ``split`` (``split_documents``); each split is a
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
    parse_split(split)
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
