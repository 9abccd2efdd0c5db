"""Megatron-compatible indexed dataset: exact bytes, round trips, merge, and every validation.

The reference for the format is written here independently of the library: ``_golden_idx``
assembles an ``.idx`` byte by byte with ``struct`` from the documented layout, and
``_parse_idx`` parses one the same way. Both are compared with the library's reader and builder.
"""

from __future__ import annotations

import os
import re
import struct
from pathlib import Path

import numpy as np
import pytest
from numpy.typing import DTypeLike

import megatron_glm.data.indexed as indexed_module
from megatron_glm.data.indexed import (
    DTYPE_CODES,
    DatasetCheck,
    IndexedDataset,
    IndexedDatasetBuilder,
    IndexedDatasetError,
    best_fitting_dtype,
    check_dataset,
    data_file_path,
    dtype_code,
    index_file_path,
    merge_datasets,
)

# Megatron-LM's codes, restated independently of the library.
REFERENCE_CODES = {
    1: "uint8",
    2: "int8",
    3: "int16",
    4: "int32",
    5: "int64",
    6: "float64",
    7: "float32",
    8: "uint16",
}


def _golden_idx(code: int, itemsize: int, docs: list[list[list[int]]]) -> bytes:
    """The .idx of ``docs`` (documents -> sentences -> tokens), assembled field by field."""
    lengths = [len(s) for d in docs for s in d]
    pointers, pos = [], 0
    for n in lengths:
        pointers.append(pos)
        pos += n * itemsize
    doc_idx = [0]
    for d in docs:
        doc_idx.append(doc_idx[-1] + len(d))
    out = b"MMIDIDX\x00\x00"
    out += struct.pack("<Q", 1)
    out += struct.pack("<B", code)
    out += struct.pack("<Q", len(lengths))
    out += struct.pack("<Q", len(doc_idx))
    out += b"".join(struct.pack("<i", n) for n in lengths)
    out += b"".join(struct.pack("<q", p) for p in pointers)
    out += b"".join(struct.pack("<q", i) for i in doc_idx)
    return out


def _golden_bin(fmt: str, docs: list[list[list[int]]]) -> bytes:
    return b"".join(struct.pack("<" + fmt, t) for d in docs for s in d for t in s)


def _parse_idx(raw: bytes) -> dict[str, object]:
    """Independent struct-based parser of an .idx file."""
    magic = raw[:9]
    version, code, n, d = struct.unpack_from("<QBQQ", raw, 9)
    off = 34
    sizes = list(struct.unpack_from(f"<{n}i", raw, off))
    off += 4 * n
    pointers = list(struct.unpack_from(f"<{n}q", raw, off))
    off += 8 * n
    doc_idx = list(struct.unpack_from(f"<{d}q", raw, off))
    off += 8 * d
    assert off == len(raw), "trailing bytes"
    return {
        "magic": magic,
        "version": version,
        "code": code,
        "sizes": sizes,
        "pointers": pointers,
        "doc_idx": doc_idx,
    }


DOCS = [[[1, 2, 3], [4]], [[5, 6]], [[7], [8, 9], [10, 11, 12, 13]]]
STRUCT_FMT = {1: "B", 2: "b", 3: "h", 4: "i", 5: "q", 6: "d", 7: "f", 8: "H"}


def _write(prefix: Path, docs: list[list[list[int]]], dtype: DTypeLike) -> None:
    with IndexedDatasetBuilder(prefix, dtype=dtype) as b:
        for d in docs:
            b.add_document(d)


def test_dtype_codes_match_megatron() -> None:
    assert {c: np.dtype(t).name for c, t in DTYPE_CODES.items()} == REFERENCE_CODES
    for code, name in REFERENCE_CODES.items():
        assert dtype_code(name) == code
        assert dtype_code(np.dtype(name)) == code
    with pytest.raises(ValueError, match="unsupported token dtype 'uint32'"):
        dtype_code(np.uint32)


def test_best_fitting_dtype() -> None:
    assert best_fitting_dtype(8000) == np.uint16
    assert best_fitting_dtype(65499) == np.uint16
    assert best_fitting_dtype(65500) == np.int32
    assert best_fitting_dtype(250_000) == np.int32


@pytest.mark.parametrize("code", sorted(REFERENCE_CODES))
def test_builder_bytes_equal_golden_and_round_trip(tmp_path: Path, code: int) -> None:
    dtype = np.dtype(REFERENCE_CODES[code])
    prefix = tmp_path / "ds"
    _write(prefix, DOCS, dtype)
    raw_idx = Path(index_file_path(prefix)).read_bytes()
    assert raw_idx == _golden_idx(code, dtype.itemsize, DOCS)
    assert Path(data_file_path(prefix)).read_bytes() == _golden_bin(STRUCT_FMT[code], DOCS)
    parsed = _parse_idx(raw_idx)
    assert parsed["magic"] == b"MMIDIDX\x00\x00" and parsed["version"] == 1
    assert parsed["code"] == code
    assert parsed["sizes"] == [3, 1, 2, 1, 2, 4]
    assert parsed["pointers"] == [dtype.itemsize * p for p in (0, 3, 4, 6, 7, 9)]
    assert parsed["doc_idx"] == [0, 2, 3, 6]

    ds = IndexedDataset(prefix)
    assert ds.dtype == dtype and len(ds) == 6 and ds.num_documents == 3
    seqs = [s for d in DOCS for s in d]
    for i, s in enumerate(seqs):
        assert ds[i].dtype == dtype
        assert ds[i].tolist() == s
    assert ds[-1].tolist() == seqs[-1]
    for d, doc in enumerate(DOCS):
        assert ds.document(d).tolist() == [t for s in doc for t in s]
        assert ds.document_sequence_sizes(d).tolist() == [len(s) for s in doc]
    assert ds.document_token_offsets().tolist() == [0, 4, 6, 13]
    assert ds.tokens.tolist() == list(range(1, 14))
    assert ds.get(5, offset=1, length=2).tolist() == [11, 12]
    assert ds.get(5, offset=2).tolist() == [12, 13]


def test_golden_file_read(tmp_path: Path) -> None:
    """A file assembled only by the test (no builder) reads back correctly."""
    prefix = tmp_path / "golden"
    Path(index_file_path(prefix)).write_bytes(_golden_idx(8, 2, DOCS))
    Path(data_file_path(prefix)).write_bytes(_golden_bin("H", DOCS))
    ds = IndexedDataset(prefix)
    assert ds.dtype == np.uint16
    assert ds.sizes.tolist() == [3, 1, 2, 1, 2, 4]
    assert ds.pointers.tolist() == [0, 6, 8, 12, 14, 18]
    assert ds.doc_idx.tolist() == [0, 2, 3, 6]
    assert [ds[i].tolist() for i in range(len(ds))] == [s for d in DOCS for s in d]


def test_views_are_zero_copy(tmp_path: Path) -> None:
    prefix = tmp_path / "ds"
    _write(prefix, DOCS, np.uint16)
    ds = IndexedDataset(prefix)
    assert np.shares_memory(ds[2], ds.tokens)
    assert np.shares_memory(ds.document(2), ds.tokens)
    assert not ds[2].flags.writeable


def test_empty_documents_and_empty_dataset(tmp_path: Path) -> None:
    prefix = tmp_path / "ds"
    with IndexedDatasetBuilder(prefix, dtype=np.int32) as b:
        b.end_document()  # empty document first
        b.add_document([[1, 2]])
        b.end_document()  # empty document last
    assert Path(index_file_path(prefix)).read_bytes() == _golden_idx(4, 4, [[], [[1, 2]], []])
    ds = IndexedDataset(prefix)
    assert ds.doc_idx.tolist() == [0, 0, 1, 1]
    assert [ds.document(d).tolist() for d in range(3)] == [[], [1, 2], []]
    assert ds.document_token_offsets().tolist() == [0, 0, 2, 2]

    empty = tmp_path / "empty"
    with IndexedDatasetBuilder(empty, dtype=np.uint16):
        pass
    ds = IndexedDataset(empty)
    assert len(ds) == 0 and ds.num_documents == 0 and len(ds.tokens) == 0
    assert Path(index_file_path(empty)).read_bytes() == _golden_idx(8, 2, [])


def test_fast_paths_equal_item_by_item(tmp_path: Path) -> None:
    _write(tmp_path / "a", DOCS, np.uint16)
    with IndexedDatasetBuilder(tmp_path / "b", dtype=np.uint16) as b:
        flat = [t for d in DOCS for s in d for t in s]
        b.add_items(np.array(flat, dtype=np.int64), [len(s) for d in DOCS for s in d])
        b.end_documents([len(d) for d in DOCS])
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"a{ext}").read_bytes() == (tmp_path / f"b{ext}").read_bytes()


def test_chunked_spill_many_sequences(tmp_path: Path) -> None:
    """More sequences than one spill chunk: index still exact."""
    rng = np.random.default_rng(0)
    n = 300_000  # > 256Ki entries per spill chunk
    lengths = rng.integers(0, 4, size=n)
    tokens = rng.integers(0, 60000, size=int(lengths.sum()))
    with IndexedDatasetBuilder(tmp_path / "big", dtype=np.uint16) as b:
        b.add_items(tokens, lengths)
        b.end_documents(np.full(n // 3, 3))
    ds = IndexedDataset(tmp_path / "big")
    assert ds.sizes.tolist() == lengths.tolist()
    expected_ptr = np.concatenate([[0], np.cumsum(lengths)[:-1]]) * 2
    assert np.array_equal(ds.pointers, expected_ptr)
    assert np.array_equal(ds.doc_idx, np.arange(0, n + 1, 3))
    assert np.array_equal(ds.tokens, tokens)


def test_token_out_of_range_is_an_error(tmp_path: Path) -> None:
    b = IndexedDatasetBuilder(tmp_path / "x", dtype=np.uint16)
    with pytest.raises(ValueError, match=r"token id 70000 does not fit dtype uint16"):
        b.add_item(np.array([1, 70000], dtype=np.int64))
    with pytest.raises(ValueError, match=r"token id -1 does not fit dtype uint16"):
        b.add_item([-1, 3])
    b.abort()
    assert sorted(os.listdir(tmp_path)) == []


def test_unclosed_document_is_an_error(tmp_path: Path) -> None:
    b = IndexedDatasetBuilder(tmp_path / "x", dtype=np.uint16)
    b.add_item([1, 2])
    with pytest.raises(ValueError, match="1 sequences not closed by end_document"):
        b.finalize()
    b.abort()


def test_exception_in_context_leaves_no_files(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), IndexedDatasetBuilder(tmp_path / "x", np.uint16) as b:
        b.add_document([[1]])
        raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []


def test_merge(tmp_path: Path) -> None:
    docs_a, docs_b = DOCS, [[[20, 21]], [], [[22], [23, 24]]]
    _write(tmp_path / "a", docs_a, np.uint16)
    _write(tmp_path / "b", docs_b, np.uint16)
    merge_datasets([str(tmp_path / "a"), str(tmp_path / "b")], str(tmp_path / "m"))
    _write(tmp_path / "ref", docs_a + docs_b, np.uint16)
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"m{ext}").read_bytes() == (tmp_path / f"ref{ext}").read_bytes()
    assert Path(index_file_path(tmp_path / "m")).read_bytes() == _golden_idx(8, 2, docs_a + docs_b)

    # merge_file after own documents, in a builder
    with IndexedDatasetBuilder(tmp_path / "m2", dtype=np.uint16) as b:
        b.add_document([[99]])
        b.merge_file(tmp_path / "b")
    assert IndexedDataset(tmp_path / "m2").doc_idx.tolist() == [0, 1, 2, 2, 4]

    _write(tmp_path / "c", docs_b, np.int32)
    with pytest.raises(ValueError, match=r"c\.idx: dtype int32 differs from the builder's uint16"):
        merge_datasets([str(tmp_path / "a"), str(tmp_path / "c")], str(tmp_path / "bad"))
    assert not (tmp_path / "bad.idx").exists() and not (tmp_path / "bad.bin").exists()
    with pytest.raises(ValueError, match="is also an input"):
        merge_datasets([str(tmp_path / "a")], str(tmp_path / "a"))


# -- validation: every rule gives an IndexedDatasetError naming the file --------------------


def _corrupt_idx(tmp_path: Path, edit: object) -> str:
    prefix = tmp_path / "ds"
    Path(data_file_path(prefix)).write_bytes(_golden_bin("H", DOCS))
    raw = bytearray(_golden_idx(8, 2, DOCS))
    edit(raw)  # type: ignore[operator]
    Path(index_file_path(prefix)).write_bytes(bytes(raw))
    return str(prefix)


def _set_q(raw: bytearray, off: int, v: int) -> None:
    struct.pack_into("<q", raw, off, v)


# offsets in the golden file: N = 6, D = 4 -> sizes at 34, pointers at 58, doc_idx at 106
@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda r: r.__setitem__(slice(0, 4), b"XXXX"), "bad magic b'XXXXIDX\\x00\\x00'"),
        (lambda r: struct.pack_into("<Q", r, 9, 2), "unsupported version 2, expected 1"),
        (lambda r: struct.pack_into("<B", r, 17, 9), "unknown dtype code 9"),
        (
            lambda r: r.__delitem__(slice(len(r) - 8, len(r))),
            "file size 130 bytes inconsistent with 6 sequences and 4 document indices "
            "(expected 138 bytes)",
        ),
        (lambda r: r.__delitem__(slice(20, len(r))), "truncated header: 20 bytes, need 34"),
        (lambda r: struct.pack_into("<Q", r, 18, 7), "inconsistent with 7 sequences"),
        (lambda r: _set_q(r, 106, 1), "document index starts at 1, expected 0"),
        (
            lambda r: _set_q(r, 106 + 24, 5),
            "document index ends at 5, expected the sequence count 6",
        ),
        (
            lambda r: _set_q(r, 106 + 8, 4),
            "document index not non-decreasing: doc_idx[1]=4 > doc_idx[2]=3",
        ),
        (
            lambda r: _set_q(r, 58 + 16, 10),
            "pointers inconsistent with sizes: pointer of sequence 2 is 10, expected 8",
        ),
        (lambda r: struct.pack_into("<i", r, 34 + 4, -1), "negative length -1 of sequence 1"),
    ],
)
def test_corrupt_index(tmp_path: Path, edit: object, message: str) -> None:
    prefix = _corrupt_idx(tmp_path, edit)
    with pytest.raises(IndexedDatasetError) as info:
        IndexedDataset(prefix)
    assert str(info.value).startswith(index_file_path(prefix) + ": ")
    assert message in str(info.value)


def test_bin_size_mismatch_and_missing_files(tmp_path: Path) -> None:
    prefix = tmp_path / "ds"
    _write(prefix, DOCS, np.uint16)
    bin_path = data_file_path(prefix)
    with open(bin_path, "r+b") as f:
        f.truncate(24)
    with pytest.raises(IndexedDatasetError) as info:
        IndexedDataset(prefix)
    assert str(info.value) == (
        f"{bin_path}: size 24 bytes != 26 bytes of tokens listed in {index_file_path(prefix)}"
    )
    os.remove(bin_path)
    with pytest.raises(IndexedDatasetError, match=f"^{re.escape(bin_path)}: file not found$"):
        IndexedDataset(prefix)
    with pytest.raises(IndexedDatasetError, match=r"nope\.idx: file not found$"):
        IndexedDataset(tmp_path / "nope")


def test_index_errors(tmp_path: Path) -> None:
    _write(tmp_path / "ds", DOCS, np.uint16)
    ds = IndexedDataset(tmp_path / "ds")
    with pytest.raises(IndexError, match="sequence 6 out of range for 6 sequences"):
        ds[6]
    with pytest.raises(IndexError, match="document 3 out of range for 3 documents"):
        ds.document(3)
    with pytest.raises(IndexError, match="length 3 at offset 2 exceeds sequence 5 of length 4"):
        ds.get(5, 2, 3)


def test_builder_memory_does_not_grow_with_sequences(tmp_path: Path) -> None:
    """1M sequences/documents leave no per-sequence Python state behind: traced memory after
    writing is flat (lists of 1M sizes and doc indices would hold > 16 MB)."""
    import tracemalloc

    b = IndexedDatasetBuilder(tmp_path / "x", np.uint16)
    ones = np.ones(50_000, dtype=np.uint16)
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        for _ in range(20):
            b.add_items(ones, np.ones(50_000, dtype=np.int64))
            b.end_documents(np.ones(50_000, dtype=np.int64))
        for _ in range(20_000):
            b.add_item(ones[:2])
            b.end_document()
        current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    b.finalize()
    assert current - base < 100_000
    assert peak - base < 4_000_000
    ds = IndexedDataset(tmp_path / "x")
    assert len(ds) == ds.num_documents == 1_020_000


# -- check_dataset: the pre-launch check, every failure named by file -------------------------


def test_check_dataset_passes_and_reports(tmp_path: Path) -> None:
    _write(tmp_path / "ds", DOCS, np.uint16)
    got = check_dataset(tmp_path / "ds", vocab_size=14)
    assert got == DatasetCheck(
        prefix=str(tmp_path / "ds"),
        dtype="uint16",
        documents=3,
        sequences=6,
        tokens=13,
        min_token_id=1,
        max_token_id=13,
        scanned_tokens=13,
        sampled=False,
    )


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda r: r.__delitem__(slice(0, len(r))), "truncated header: 0 bytes, need 34"),
        (lambda r: r.__delitem__(slice(20, len(r))), "truncated header: 20 bytes, need 34"),
        (
            lambda r: r.__setitem__(slice(0, len(r)), bytes(range(256)) * 2),
            "bad magic b'\\x00\\x01\\x02\\x03\\x04\\x05\\x06\\x07\\x08', expected "
            "b'MMIDIDX\\x00\\x00' (not a Megatron MMapIndexedDataset index)",
        ),
        (lambda r: struct.pack_into("<Q", r, 9, 2), "unsupported version 2, expected 1"),
        (lambda r: struct.pack_into("<B", r, 17, 0), "unknown dtype code 0, expected one of 1..8"),
        (
            lambda r: r.__delitem__(slice(len(r) - 8, len(r))),
            "file size 130 bytes inconsistent with 6 sequences and 4 document indices "
            "(expected 138 bytes)",
        ),
        (
            lambda r: struct.pack_into("<Q", r, 18, 1 << 40),
            "file size 138 bytes inconsistent with 1099511627776 sequences",
        ),
    ],
    ids=["empty", "truncated", "garbage", "version", "dtype-code", "cut", "huge-count"],
)
def test_check_dataset_bad_index(tmp_path: Path, edit: object, message: str) -> None:
    prefix = _corrupt_idx(tmp_path, edit)
    with pytest.raises(ValueError) as info:
        check_dataset(prefix, vocab_size=100)
    assert str(info.value).startswith(f"{index_file_path(prefix)}: {message}")


def test_check_dataset_missing_and_truncated_files(tmp_path: Path) -> None:
    prefix = tmp_path / "ds"
    with pytest.raises(ValueError, match=f"^{re.escape(index_file_path(prefix))}: file not found$"):
        check_dataset(prefix, vocab_size=100)
    _write(prefix, DOCS, np.uint16)
    bin_path = data_file_path(prefix)
    with open(bin_path, "r+b") as f:
        f.truncate(13)  # half a token short of 13 tokens, and then some
    with pytest.raises(ValueError) as info:
        check_dataset(prefix, vocab_size=100)
    assert str(info.value) == (
        f"{bin_path}: size 13 bytes != 26 bytes of tokens listed in {index_file_path(prefix)}"
    )
    os.remove(bin_path)
    with pytest.raises(ValueError, match=f"^{re.escape(bin_path)}: file not found$"):
        check_dataset(prefix, vocab_size=100)


def test_check_dataset_unreadable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An OSError while reading (permissions, I/O; root passes permission checks, so raised
    here by hand) is named like the other faults."""
    _write(tmp_path / "ds", DOCS, np.uint16)
    idx = index_file_path(tmp_path / "ds")

    def denied(self: IndexedDataset) -> None:
        raise PermissionError(13, "Permission denied", idx)

    monkeypatch.setattr(IndexedDataset, "_read_header", denied)
    with pytest.raises(ValueError, match=f"^{re.escape(idx)}: cannot read: Permission denied$"):
        check_dataset(tmp_path / "ds", vocab_size=100)


def test_check_dataset_empty(tmp_path: Path) -> None:
    _write(tmp_path / "none", [], np.uint16)
    with pytest.raises(ValueError) as info:
        check_dataset(tmp_path / "none", vocab_size=100)
    assert str(info.value) == f"{tmp_path / 'none.idx'}: empty dataset: no documents"
    _write(tmp_path / "blank", [[], [[]]], np.uint16)
    with pytest.raises(ValueError) as info:
        check_dataset(tmp_path / "blank", vocab_size=100)
    assert str(info.value) == f"{tmp_path / 'blank.bin'}: empty dataset: 2 documents but no tokens"


@pytest.mark.parametrize(
    ("dtype", "bad", "where", "message"),
    [
        (np.uint16, 14, (1, 0, 1), "token id 14 outside the vocabulary [0, 14) at token 5"),
        (np.int32, -3, (2, 2, 3), "token id -3 outside the vocabulary [0, 14) at token 12"),
        (np.uint8, 255, (0, 1, 0), "token id 255 outside the vocabulary [0, 14) at token 3"),
    ],
)
def test_check_dataset_token_ids_outside_vocab(
    tmp_path: Path, dtype: type, bad: int, where: tuple[int, int, int], message: str
) -> None:
    docs = [[list(s) for s in d] for d in DOCS]
    d, k, t = where
    docs[d][k][t] = bad
    _write(tmp_path / "ds", docs, dtype)
    seq = sum(len(x) for x in docs[:d]) + k
    with pytest.raises(ValueError) as info:
        check_dataset(tmp_path / "ds", vocab_size=14)
    assert str(info.value) == (
        f"{tmp_path / 'ds.bin'}: {message} (document {d}, sequence {seq}); was it made with "
        f"another tokenizer?"
    )
    if bad > 0:  # a vocabulary that holds it: passes
        assert check_dataset(tmp_path / "ds", vocab_size=bad + 1).max_token_id == bad


def test_check_dataset_float_tokens(tmp_path: Path) -> None:
    _write(tmp_path / "f", DOCS, np.float32)
    with pytest.raises(ValueError, match=r"f\.idx: dtype float32 cannot hold token ids$"):
        check_dataset(tmp_path / "f", vocab_size=100)


def test_check_dataset_samples_large_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Over FULL_SCAN_BYTES only SAMPLE_CHUNKS evenly spread chunks are read (first and last
    included): a bad id inside one is found, one between them is not (the documented limit)."""
    monkeypatch.setattr(indexed_module, "FULL_SCAN_BYTES", 1000)
    monkeypatch.setattr(indexed_module, "SAMPLE_CHUNKS", 4)
    monkeypatch.setattr(indexed_module, "SAMPLE_CHUNK_BYTES", 20)  # 10 uint16 tokens
    tokens = np.arange(1000, dtype=np.int64) % 50  # 2000 bytes, one document of one sequence
    # chunks start at linspace(0, 990, 4) = 0, 330, 660, 990
    for at, found in [(335, True), (999, True), (0, True), (500, False), (345, False)]:
        t = tokens.copy()
        t[at] = 60
        _write(tmp_path / f"s{at}", [[t.tolist()]], np.uint16)
        if found:
            with pytest.raises(ValueError, match=f"token id 60 outside .* at token {at} "):
                check_dataset(tmp_path / f"s{at}", vocab_size=50)
        else:
            got = check_dataset(tmp_path / f"s{at}", vocab_size=50)
            assert got.sampled and got.scanned_tokens == 40 and got.max_token_id == 49
