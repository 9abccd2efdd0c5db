"""Memory-mapped indexed dataset, byte-compatible with Megatron-LM's ``MMapIndexedDataset``.

A dataset is a pair of files sharing a prefix:

``{prefix}.bin``
    The tokens of every sequence, back to back, in the dataset's dtype (little endian), no header.

``{prefix}.idx`` (all integers little endian)::

    offset  size    field
    0       9       magic  b"MMIDIDX\\x00\\x00"
    9       8       uint64 version = 1
    17      1       uint8  dtype code (see DTYPE_CODES)
    18      8       uint64 N, the number of sequences
    26      8       uint64 D, the number of documents + 1
    34      4N      int32[N] sequence lengths (in tokens)
    34+4N   8N      int64[N] byte offset of each sequence in .bin
    34+12N  8D      int64[D] document index: first sequence of each document, 0 ... N

A *sequence* is one sentence (``--split-sentences``) or one whole document; a document is the
contiguous run of sequences ``doc_idx[d] .. doc_idx[d + 1]``. Megatron-LM and GPT-NeoX read and
write exactly this layout, so corpora move between them and this project unchanged.

Empty documents: like Megatron-LM, ``end_document`` with no sequence added since the previous one
records an empty document (``doc_idx`` repeats a value). The reader accepts that (``doc_idx`` must
only be non-decreasing) and ``document(d)`` returns an empty array for it. The preprocessor never
produces one (empty texts are reported as bad lines), but datasets from other tools may.

Memory: the reader maps both files and copies nothing. The builder streams tokens to ``.bin`` and
spills sequence lengths and document indices to temporary binary files in fixed-size numpy
chunks, so its memory does not grow with the corpus (100M sentences cost the same RAM as 100).
``finalize`` assembles the ``.idx`` from the spill files chunk by chunk and publishes both files
by atomic rename, so a crashed run never leaves a half-written dataset under the final name.
"""

from __future__ import annotations

import os
import shutil
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import IO, Any

import numpy as np
from numpy.typing import ArrayLike, DTypeLike

__all__ = [
    "DTYPE_CODES",
    "FULL_SCAN_BYTES",
    "HEADER_SIZE",
    "INDEX_MAGIC",
    "INDEX_VERSION",
    "DatasetCheck",
    "IndexedDataset",
    "IndexedDatasetBuilder",
    "IndexedDatasetError",
    "best_fitting_dtype",
    "check_dataset",
    "data_file_path",
    "dtype_code",
    "index_file_path",
    "merge_datasets",
]

INDEX_MAGIC = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
# magic (9) + version (8) + dtype code (1) + sequence count (8) + document count (8)
HEADER_SIZE = 34
_HEADER = struct.Struct("<9sQBQQ")
assert _HEADER.size == HEADER_SIZE

# Megatron-LM's DType enum: code -> numpy scalar type.
DTYPE_CODES: dict[int, type[np.number]] = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float64,
    7: np.float32,
    8: np.uint16,
}

# Elements processed at a time when streaming index arrays (bounded memory, ~8 MB per int64 chunk).
_CHUNK = 1 << 20


def _le(dtype: DTypeLike) -> np.dtype:
    """The little-endian form of ``dtype`` (the on-disk byte order; a no-op on x86/ARM)."""
    return np.dtype(dtype).newbyteorder("<")


_I32 = _le(np.int32)
_I64 = _le(np.int64)


def dtype_code(dtype: DTypeLike) -> int:
    """The Megatron dtype code of ``dtype``; ValueError for a dtype the format cannot store."""
    try:
        dt = np.dtype(dtype)
    except TypeError as e:
        raise ValueError(f"unsupported token dtype {dtype!r}: {e}") from e
    for code, scalar in DTYPE_CODES.items():
        if dt.type is scalar:
            return code
    names = ", ".join(np.dtype(t).name for t in DTYPE_CODES.values())
    raise ValueError(f"unsupported token dtype {dt.name!r}; the format stores only: {names}")


def best_fitting_dtype(vocab_size: int) -> np.dtype:
    """uint16 for vocabularies under 65500 tokens, else int32 (Megatron-LM's rule)."""
    if vocab_size <= 0:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    return np.dtype(np.uint16) if vocab_size < 65500 else np.dtype(np.int32)


def data_file_path(prefix: str | os.PathLike[str]) -> str:
    """``{prefix}.bin``."""
    return os.fspath(prefix) + ".bin"


def index_file_path(prefix: str | os.PathLike[str]) -> str:
    """``{prefix}.idx``."""
    return os.fspath(prefix) + ".idx"


class IndexedDatasetError(ValueError):
    """A ``.bin``/``.idx`` pair that is missing, corrupt or inconsistent; names file and problem."""


def _chunks(n: int, chunk: int = _CHUNK) -> Iterator[tuple[int, int]]:
    for start in range(0, n, chunk):
        yield start, min(n, start + chunk)


class IndexedDataset:
    """Read-only, zero-copy view of a ``.bin``/``.idx`` pair.

    Every consistency rule of the format is checked on open (see ``_validate``), in chunks, so a
    truncated copy or a mismatched pair fails here with the file named instead of producing
    garbage tokens deep inside training. All arrays are views of the memory maps; slicing them
    costs nothing and the OS page cache is shared by every rank reading the same files.
    """

    def __init__(self, prefix: str | os.PathLike[str]) -> None:
        self.prefix = os.fspath(prefix)
        self.index_path = index_file_path(prefix)
        self.data_path = data_file_path(prefix)
        for path in (self.index_path, self.data_path):
            if not os.path.isfile(path):
                raise IndexedDatasetError(f"{path}: file not found")
        code, n, d = self._read_header()
        self.dtype: np.dtype = _le(DTYPE_CODES[code])
        self._itemsize = self.dtype.itemsize
        self._idx_map = np.memmap(self.index_path, dtype=np.uint8, mode="r")
        o_ptr = HEADER_SIZE + 4 * n
        o_doc = o_ptr + 8 * n
        self.sizes: np.ndarray = self._idx_map[HEADER_SIZE:o_ptr].view(_I32)  # [N]
        self.pointers: np.ndarray = self._idx_map[o_ptr:o_doc].view(_I64)  # [N]
        self.doc_idx: np.ndarray = self._idx_map[o_doc : o_doc + 8 * d].view(_I64)  # [D]
        self._total_tokens = self._validate()
        if self._total_tokens == 0:
            self.tokens: np.ndarray = np.empty(0, dtype=self.dtype)  # np.memmap rejects 0 bytes
        else:
            self.tokens = np.memmap(self.data_path, dtype=self.dtype, mode="r")  # [total tokens]

    # -- validation -----------------------------------------------------------------------
    def _fail(self, path: str, what: str) -> IndexedDatasetError:
        return IndexedDatasetError(f"{path}: {what}")

    def _read_header(self) -> tuple[int, int, int]:
        path = self.index_path
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            raw = f.read(HEADER_SIZE)
        if len(raw) < HEADER_SIZE and INDEX_MAGIC.startswith(raw[: len(INDEX_MAGIC)]):
            raise self._fail(path, f"truncated header: {size} bytes, need {HEADER_SIZE}")
        if raw[: len(INDEX_MAGIC)] != INDEX_MAGIC:
            raise self._fail(
                path,
                f"bad magic {raw[: len(INDEX_MAGIC)]!r}, expected {INDEX_MAGIC!r} "
                "(not a Megatron MMapIndexedDataset index)",
            )
        _, version, code, n, d = _HEADER.unpack(raw)
        if version != INDEX_VERSION:
            raise self._fail(path, f"unsupported version {version}, expected {INDEX_VERSION}")
        if code not in DTYPE_CODES:
            raise self._fail(path, f"unknown dtype code {code}, expected one of 1..8")
        expected = HEADER_SIZE + 12 * n + 8 * d
        if size != expected:
            raise self._fail(
                path,
                f"file size {size} bytes inconsistent with {n} sequences and {d} document "
                f"indices (expected {expected} bytes)",
            )
        return code, n, d

    def _validate(self) -> int:
        """Check doc_idx, pointers against sizes, and the .bin size; return the token count."""
        path, n = self.index_path, len(self.sizes)
        doc = self.doc_idx
        if len(doc) == 0:
            raise self._fail(path, "document index is empty (must hold at least [0])")
        if doc[0] != 0:
            raise self._fail(path, f"document index starts at {int(doc[0])}, expected 0")
        if doc[-1] != n:
            raise self._fail(
                path, f"document index ends at {int(doc[-1])}, expected the sequence count {n}"
            )
        for a, b in _chunks(len(doc) - 1):
            step = np.diff(doc[a : b + 1])
            if (step < 0).any():
                i = a + int(np.argmax(step < 0))
                raise self._fail(
                    path,
                    f"document index not non-decreasing: doc_idx[{i}]={int(doc[i])} > "
                    f"doc_idx[{i + 1}]={int(doc[i + 1])}",
                )
        total_bytes = 0
        for a, b in _chunks(n):
            sizes = self.sizes[a:b].astype(np.int64)
            if (sizes < 0).any():
                i = a + int(np.argmax(sizes < 0))
                raise self._fail(path, f"negative length {int(self.sizes[i])} of sequence {i}")
            ends = total_bytes + np.cumsum(sizes * self._itemsize)
            starts = ends - sizes * self._itemsize
            bad = starts != self.pointers[a:b]
            if bad.any():
                i = int(np.argmax(bad))
                raise self._fail(
                    path,
                    f"pointers inconsistent with sizes: pointer of sequence {a + i} is "
                    f"{int(self.pointers[a + i])}, expected {int(starts[i])} (cumulative bytes)",
                )
            total_bytes = int(ends[-1])
        bin_size = os.path.getsize(self.data_path)
        if bin_size != total_bytes:
            raise self._fail(
                self.data_path,
                f"size {bin_size} bytes != {total_bytes} bytes of tokens listed in "
                f"{self.index_path}",
            )
        return total_bytes // self._itemsize

    # -- access ---------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.sizes)

    def _seq_index(self, i: int) -> int:
        n = len(self.sizes)
        j = int(i) + n if i < 0 else int(i)
        if not 0 <= j < n:
            raise IndexError(f"sequence {i} out of range for {n} sequences in {self.prefix}")
        return j

    def __getitem__(self, i: int) -> np.ndarray:
        """Zero-copy view of sequence ``i`` (negative indices count from the end)."""
        j = self._seq_index(i)
        start = int(self.pointers[j]) // self._itemsize
        return self.tokens[start : start + int(self.sizes[j])]

    def get(self, i: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Zero-copy view of ``length`` tokens of sequence ``i`` starting at token ``offset``."""
        seq = self[i]
        if not 0 <= offset <= len(seq):
            raise IndexError(f"offset {offset} outside sequence {i} of length {len(seq)}")
        end = len(seq) if length is None else offset + length
        if length is not None and (length < 0 or end > len(seq)):
            raise IndexError(
                f"length {length} at offset {offset} exceeds sequence {i} of length {len(seq)}"
            )
        return seq[offset:end]

    @property
    def num_documents(self) -> int:
        return len(self.doc_idx) - 1

    @property
    def num_tokens(self) -> int:
        return self._total_tokens

    def _doc_index(self, d: int) -> int:
        m = self.num_documents
        j = int(d) + m if d < 0 else int(d)
        if not 0 <= j < m:
            raise IndexError(f"document {d} out of range for {m} documents in {self.prefix}")
        return j

    def _seq_token_offset(self, s: np.ndarray | int) -> np.ndarray:
        """Token offset where sequence ``s`` starts; ``s == N`` maps to the end of the data."""
        s = np.asarray(s, dtype=np.int64)
        n = len(self.sizes)
        if n == 0:
            return np.zeros(s.shape, dtype=np.int64)
        inside = self.pointers[np.minimum(s, n - 1)] // self._itemsize
        return np.where(s < n, inside, self._total_tokens).astype(np.int64)

    def document(self, d: int) -> np.ndarray:
        """Zero-copy view of every token of document ``d`` (its sequences are contiguous)."""
        j = self._doc_index(d)
        a, b = self._seq_token_offset(self.doc_idx[j : j + 2])
        return self.tokens[int(a) : int(b)]

    def document_sequence_sizes(self, d: int) -> np.ndarray:
        """Lengths of the sequences (sentences) of document ``d``, a view of ``sizes``."""
        j = self._doc_index(d)
        return self.sizes[int(self.doc_idx[j]) : int(self.doc_idx[j + 1])]

    def document_token_offsets(self) -> np.ndarray:
        """int64 [num_documents + 1]: token offset in ``tokens`` where each document starts."""
        return self._seq_token_offset(self.doc_idx)

    def close(self) -> None:
        """Drop the memory maps (arrays handed out earlier keep their own reference)."""
        for name in ("sizes", "pointers", "doc_idx", "tokens", "_idx_map"):
            self.__dict__.pop(name, None)

    def __repr__(self) -> str:
        return (
            f"IndexedDataset({self.prefix!r}, dtype={self.dtype.name}, sequences={len(self)}, "
            f"documents={self.num_documents}, tokens={self._total_tokens})"
        )


# -- pre-launch check -----------------------------------------------------------------------

FULL_SCAN_BYTES = 1 << 30
"""A ``.bin`` up to this size has every token id checked by :func:`check_dataset`; a larger one
a sample of :data:`SAMPLE_CHUNKS` chunks of :data:`SAMPLE_CHUNK_BYTES`."""
SAMPLE_CHUNKS = 64
SAMPLE_CHUNK_BYTES = 1 << 20
_SCAN_CHUNK_BYTES = 64 << 20  # memory of one step of the full scan


@dataclass(frozen=True)
class DatasetCheck:
    """What :func:`check_dataset` saw in a dataset that passed."""

    prefix: str
    dtype: str
    documents: int
    sequences: int
    tokens: int
    min_token_id: int
    max_token_id: int
    """Smallest and largest id among the tokens scanned."""
    scanned_tokens: int
    """Tokens whose ids were checked: all of them, or fewer when ``sampled``."""
    sampled: bool


def check_dataset(prefix: str | os.PathLike[str], vocab_size: int) -> DatasetCheck:
    """Check the dataset at ``prefix`` before a run; raise :class:`IndexedDatasetError` (a
    ValueError) naming the file and what is wrong, so that a bad corpus stops the launch instead
    of a rank (an IndexError in the embedding, or garbage tokens) hours into training.

    Checked, in this order:

    * everything :class:`IndexedDataset` checks on open: both files exist and are readable; the
      ``.idx`` header (magic, version 1, a known dtype code), its size against its sequence and
      document counts, the document index, the pointers against the sizes, and the ``.bin``
      size against the tokens the index lists (a truncated copy fails here);
    * an integer token dtype, at least one document and at least one token;
    * every token id scanned lies in ``[0, vocab_size)`` (``vocab_size``: the tokenizer's,
      the number of real ids). A ``.bin`` of at most :data:`FULL_SCAN_BYTES` (1 GiB) is scanned
      whole, in chunks of the memory map (memory stays one chunk, 64 MiB; 0.02 s for 190 MiB
      in the page cache, else the disk's read time). A larger one is *sampled*:
      :data:`SAMPLE_CHUNKS` (64) chunks of :data:`SAMPLE_CHUNK_BYTES` (1 MiB) at evenly spread
      offsets, the first and the last included: a corpus made with another tokenizer has such
      ids everywhere and fails, but a few corrupt tokens can pass;
      :class:`megatron_glm.data.packed_dataset.PackedDataset` given a ``vocab_size`` checks each
      window it serves.
    """
    if vocab_size < 1:
        raise ValueError(f"check_dataset: vocab_size must be >= 1, got {vocab_size}")
    try:
        ds = IndexedDataset(prefix)
    except OSError as e:  # unreadable (permissions, I/O error): named like the other faults
        where = e.filename or index_file_path(prefix)
        raise IndexedDatasetError(f"{where}: cannot read: {e.strerror or e}") from e
    try:
        if not np.issubdtype(ds.dtype, np.integer):
            raise IndexedDatasetError(
                f"{ds.index_path}: dtype {ds.dtype.name} cannot hold token ids"
            )
        if ds.num_documents == 0:
            raise IndexedDatasetError(f"{ds.index_path}: empty dataset: no documents")
        if ds.num_tokens == 0:
            raise IndexedDatasetError(
                f"{ds.data_path}: empty dataset: {ds.num_documents} documents but no tokens"
            )
        return _check_token_ids(ds, vocab_size)
    finally:
        ds.close()


def _scan_ranges(ds: IndexedDataset) -> tuple[list[tuple[int, int]], bool]:
    """Token ranges ``[a, b)`` to scan and whether they are a sample (see check_dataset)."""
    n, size = ds.num_tokens, ds.num_tokens * ds.dtype.itemsize
    if size <= FULL_SCAN_BYTES:
        step = _SCAN_CHUNK_BYTES // ds.dtype.itemsize
        return list(_chunks(n, step)), False
    length = SAMPLE_CHUNK_BYTES // ds.dtype.itemsize
    starts = np.linspace(0, n - length, SAMPLE_CHUNKS).astype(np.int64).tolist()
    return [(a, a + length) for a in starts], True


def _check_token_ids(ds: IndexedDataset, vocab_size: int) -> DatasetCheck:
    ranges, sampled = _scan_ranges(ds)
    lo, hi = None, None
    for a, b in ranges:
        chunk = ds.tokens[a:b]
        c_lo, c_hi = int(chunk.min()), int(chunk.max())
        if c_lo < 0 or c_hi >= vocab_size:
            bad = a + int(np.argmax((chunk < 0) | (chunk >= vocab_size)))
            raise IndexedDatasetError(f"{ds.data_path}: {_bad_token_message(ds, bad, vocab_size)}")
        lo = c_lo if lo is None else min(lo, c_lo)
        hi = c_hi if hi is None else max(hi, c_hi)
    assert lo is not None and hi is not None  # the dataset has tokens
    return DatasetCheck(
        prefix=ds.prefix,
        dtype=ds.dtype.name,
        documents=ds.num_documents,
        sequences=len(ds),
        tokens=ds.num_tokens,
        min_token_id=lo,
        max_token_id=hi,
        scanned_tokens=sum(b - a for a, b in ranges),
        sampled=sampled,
    )


def _bad_token_message(ds: IndexedDataset, token: int, vocab_size: int) -> str:
    """Where token ``token`` (an offset into ``.bin``, in tokens) lies, and why it is bad."""
    seq = int(np.searchsorted(ds.pointers, token * ds.dtype.itemsize, side="right")) - 1
    doc = int(np.searchsorted(ds.doc_idx, seq, side="right")) - 1
    value = int(ds.tokens[token])
    return (
        f"token id {value} outside the vocabulary [0, {vocab_size}) at token {token} "
        f"(document {doc}, sequence {seq}); was it made with another tokenizer?"
    )


class _Spill:
    """Append-only integer array spilled to a binary file in fixed-size chunks (bounded memory)."""

    def __init__(self, path: str, dtype: np.dtype) -> None:
        self.path = path
        self.dtype = dtype
        self._buf = np.empty(_CHUNK // 4, dtype=dtype)
        self._fill = 0
        self.count = 0
        self._file: IO[bytes] | None = open(path, "wb")  # noqa: SIM115 - closed in close()

    def append(self, value: int) -> None:
        self._buf[self._fill] = value
        self._fill += 1
        self.count += 1
        if self._fill == len(self._buf):
            self._flush()

    def extend(self, values: np.ndarray) -> None:
        self._flush()
        assert self._file is not None
        self._file.write(np.ascontiguousarray(values, dtype=self.dtype).tobytes())
        self.count += len(values)

    def _flush(self) -> None:
        if self._fill:
            assert self._file is not None
            self._file.write(self._buf[: self._fill].tobytes())
            self._fill = 0

    def read_chunks(self) -> Iterator[np.ndarray]:
        """Flush, close for writing, and yield the content in chunks of at most ``_CHUNK``."""
        self._flush()
        if self._file is not None:
            self._file.close()
            self._file = None
        with open(self.path, "rb") as f:
            while True:
                raw = f.read(_CHUNK * self.dtype.itemsize)
                if not raw:
                    break
                yield np.frombuffer(raw, dtype=self.dtype)

    def remove(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if os.path.exists(self.path):
            os.remove(self.path)


class IndexedDatasetBuilder:
    """Streams sequences to ``{prefix}.bin`` and writes ``{prefix}.idx`` on ``finalize``.

    Usage::

        with IndexedDatasetBuilder(prefix, dtype=np.uint16) as b:
            b.add_document([sentence0_ids, sentence1_ids])
        # files are published when the block exits without an exception, and discarded if not

    Token values are range-checked when they do not fit the dtype by construction, so a vocab
    that outgrew uint16 fails loudly instead of wrapping around.
    """

    def __init__(self, prefix: str | os.PathLike[str], dtype: DTypeLike = np.int32) -> None:
        self.prefix = os.fspath(prefix)
        self._code = dtype_code(dtype)
        self.dtype: np.dtype = _le(DTYPE_CODES[self._code])
        self._info: np.iinfo | None = (
            np.iinfo(self.dtype) if np.issubdtype(self.dtype, np.integer) else None
        )
        tag = f".tmp{os.getpid()}"
        self._bin_tmp = data_file_path(prefix) + tag
        self._idx_tmp = index_file_path(prefix) + tag
        self._bin: IO[bytes] | None = open(self._bin_tmp, "wb")  # noqa: SIM115
        self._sizes = _Spill(self._idx_tmp + ".sizes", _I32)
        self._docs = _Spill(self._idx_tmp + ".docs", _I64)
        self._docs.append(0)
        self._open_sequences = 0  # sequences added since the last end_document
        self.num_tokens = 0

    # -- writing --------------------------------------------------------------------------
    def _as_tokens(self, tokens: ArrayLike) -> np.ndarray:
        arr = np.asarray(tokens)
        if arr.ndim != 1:
            raise ValueError(f"a sequence must be 1-D, got shape {arr.shape}")
        if arr.dtype == self.dtype:
            return arr
        if arr.size == 0:
            return arr.astype(self.dtype)
        if self._info is not None and not np.can_cast(arr.dtype, self.dtype, "safe"):
            if not np.issubdtype(arr.dtype, np.integer):
                raise ValueError(f"{self.prefix}: tokens of dtype {arr.dtype} for a {self.dtype}")
            lo, hi = int(arr.min()), int(arr.max())
            if lo < self._info.min or hi > self._info.max:
                raise ValueError(
                    f"{self.prefix}: token id {lo if lo < self._info.min else hi} does not fit "
                    f"dtype {self.dtype.name} [{self._info.min}, {self._info.max}]"
                )
        return arr.astype(self.dtype)

    def _file(self) -> IO[bytes]:
        if self._bin is None:
            raise ValueError(f"{self.prefix}: builder already finalized or aborted")
        return self._bin

    def add_item(self, tokens: ArrayLike) -> None:
        """Append one sequence (a sentence, or a whole document when not splitting)."""
        arr = self._as_tokens(tokens)
        self._file().write(arr.tobytes())
        self._sizes.append(len(arr))
        self.num_tokens += len(arr)
        self._open_sequences += 1

    def add_items(self, tokens: ArrayLike, lengths: ArrayLike) -> None:
        """Append several sequences at once: ``tokens`` is their concatenation (fast path)."""
        arr = self._as_tokens(tokens)
        lens = np.asarray(lengths, dtype=np.int64)
        if lens.ndim != 1 or (lens < 0).any() or int(lens.sum()) != len(arr):
            raise ValueError(
                f"{self.prefix}: lengths (sum {int(lens.sum())}) do not partition {len(arr)} tokens"
            )
        self._file().write(arr.tobytes())
        self._sizes.extend(lens)
        self.num_tokens += len(arr)
        self._open_sequences += len(lens)

    def end_document(self) -> None:
        """Close the current document (an empty one if no sequence was added since the last)."""
        self._file()
        self._docs.append(self._sizes.count)
        self._open_sequences = 0

    def end_documents(self, sequences_per_document: ArrayLike) -> None:
        """Close several documents made of the sequences added last, in order (fast path)."""
        counts = np.asarray(sequences_per_document, dtype=np.int64)
        if (counts < 0).any() or int(counts.sum()) != self._open_sequences:
            raise ValueError(
                f"{self.prefix}: document sequence counts sum to {int(counts.sum())}, but "
                f"{self._open_sequences} sequences are open"
            )
        self._file()
        start = self._sizes.count - self._open_sequences
        self._docs.extend(start + np.cumsum(counts))
        self._open_sequences = 0

    def add_document(self, sequences: Sequence[ArrayLike]) -> None:
        """Append the sequences of one document and close it."""
        for seq in sequences:
            self.add_item(seq)
        self.end_document()

    def merge_file(self, prefix: str | os.PathLike[str]) -> None:
        """Append every document of the dataset at ``prefix`` (same dtype required)."""
        if self._open_sequences:
            raise ValueError(
                f"{self.prefix}: merge_file({os.fspath(prefix)!r}) with {self._open_sequences} "
                "sequences not closed by end_document"
            )
        other = IndexedDataset(prefix)
        if other.dtype != self.dtype:
            raise ValueError(
                f"{other.index_path}: dtype {other.dtype.name} differs from the builder's "
                f"{self.dtype.name}; merge datasets of one dtype"
            )
        base = self._sizes.count
        for a, b in _chunks(len(other)):
            self._sizes.extend(other.sizes[a:b])
        for a, b in _chunks(other.num_documents):
            self._docs.extend(other.doc_idx[a + 1 : b + 1] + base)
        with open(other.data_path, "rb") as src:
            shutil.copyfileobj(src, self._file(), 16 << 20)
        self.num_tokens += other.num_tokens
        other.close()

    # -- finishing ------------------------------------------------------------------------
    def finalize(self) -> None:
        """Write ``.idx`` and publish ``.bin`` and ``.idx`` by atomic rename."""
        bin_file = self._file()
        if self._open_sequences:
            raise ValueError(
                f"{self.prefix}: finalize with {self._open_sequences} sequences not closed by "
                "end_document (they would belong to no document)"
            )
        bin_file.close()
        self._bin = None
        with open(self._idx_tmp, "wb") as f:
            f.write(
                _HEADER.pack(
                    INDEX_MAGIC, INDEX_VERSION, self._code, self._sizes.count, self._docs.count
                )
            )
            for chunk in self._sizes.read_chunks():
                f.write(chunk.tobytes())
            offset = 0
            for chunk in self._sizes.read_chunks():
                nbytes = chunk.astype(np.int64) * self.dtype.itemsize
                ends = offset + np.cumsum(nbytes)
                f.write((ends - nbytes).astype(_I64).tobytes())
                offset = int(ends[-1])
            for chunk in self._docs.read_chunks():
                f.write(chunk.tobytes())
        os.replace(self._bin_tmp, data_file_path(self.prefix))
        os.replace(self._idx_tmp, index_file_path(self.prefix))
        self._sizes.remove()
        self._docs.remove()

    def abort(self) -> None:
        """Discard everything written so far (no file under the final names is touched)."""
        if self._bin is not None:
            self._bin.close()
            self._bin = None
        for path in (self._bin_tmp, self._idx_tmp):
            if os.path.exists(path):
                os.remove(path)
        self._sizes.remove()
        self._docs.remove()

    def __enter__(self) -> IndexedDatasetBuilder:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.finalize()
        else:
            self.abort()

    def __repr__(self) -> str:
        return (
            f"IndexedDatasetBuilder({self.prefix!r}, dtype={self.dtype.name}, "
            f"sequences={self._sizes.count}, documents={self._docs.count - 1})"
        )


def merge_datasets(prefixes: Sequence[str | os.PathLike[str]], output_prefix: str) -> None:
    """Concatenate the datasets at ``prefixes`` (in order, one dtype) into ``output_prefix``."""
    if not prefixes:
        raise ValueError("merge_datasets: no input prefixes")
    out = os.path.abspath(output_prefix)
    for p in prefixes:
        if os.path.abspath(os.fspath(p)) == out:
            raise ValueError(f"merge_datasets: output prefix {output_prefix!r} is also an input")
    first = IndexedDataset(prefixes[0])
    dtype: Any = first.dtype
    first.close()
    with IndexedDatasetBuilder(output_prefix, dtype=dtype) as builder:
        for p in prefixes:
            builder.merge_file(p)
