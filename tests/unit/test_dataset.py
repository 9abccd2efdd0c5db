"""Packed windows, splits and index caches, checked against a per-document Python reference.

The reference (``_reference_windows``) rebuilds the token stream of an epoch from the documents as
written by the test (not as read back by the library), one document at a time: sentences, then one
eos unless the document already ends with it, cut every ``window_length`` tokens, with sentence
starts taken from the test's own sentence lists. Given the dataset's document order for the epoch,
the dataset's windows must equal the reference's windows exactly (as a multiset, since window order
is shuffled), which also proves every token appears exactly once per epoch.
"""

from __future__ import annotations

import collections
import json
import logging
import multiprocessing as mp
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from megatron_glm.config import parse_split
from megatron_glm.data.dataset_builder import build_pretrain_datasets, split_documents
from megatron_glm.data.index_cache import FORMAT_VERSION
from megatron_glm.data.indexed import IndexedDataset, IndexedDatasetBuilder
from megatron_glm.data.packed_dataset import PackedDataset, Window

EOS = 1
Doc = list[list[int]]


def _make_documents(seed: int) -> list[Doc]:
    """Random documents covering every packing edge case; content tokens are never EOS."""
    rng = np.random.default_rng(seed)
    docs: list[Doc] = []
    for i in range(40):
        n_sent = 1 if i % 5 == 0 else int(rng.integers(1, 6))  # many one-sentence documents
        doc = [rng.integers(2, 50, int(rng.integers(1, 13))).tolist() for _ in range(n_sent)]
        if i % 2:  # preprocessed with --append-eod
            doc[-1].append(EOS)
        docs.append(doc)
    docs.append([rng.integers(2, 50, 30).tolist() for _ in range(10)])  # spans many windows
    docs.append([[*rng.integers(2, 50, 25).tolist(), EOS]])  # long, one sentence, eos stored
    docs.append([])  # empty document: no sequence at all -> a lone eos
    docs.append([[]])  # one empty sequence -> a lone eos
    docs.append([[EOS]])  # just the eos: nothing appended
    docs.append([[5, 6], [], [7, 8, 9]])  # an empty sentence in the middle
    docs.append([[5, 6], []])  # ends with an empty sentence: the appended eos starts nothing
    docs.append([[5, EOS], []])  # the last stored token is eos: nothing appended
    order = rng.permutation(len(docs))  # edge cases anywhere in the corpus
    return [docs[k] for k in order]


def _write_corpus(prefix: Path, docs: list[Doc]) -> IndexedDataset:
    with IndexedDatasetBuilder(prefix, dtype=np.uint16) as builder:
        for doc in docs:
            builder.add_document([np.asarray(s, dtype=np.uint16) for s in doc])
    return IndexedDataset(prefix)


def _reference_stream(docs: list[Doc], order: np.ndarray) -> tuple[list[int], set[int]]:
    stream: list[int] = []
    starts: set[int] = set()
    for d in order:
        doc_start = len(stream)
        starts.add(doc_start)
        for sentence in docs[d]:
            if sentence:  # an empty sentence has no token to start
                starts.add(len(stream))
            stream.extend(sentence)
        if len(stream) == doc_start or stream[-1] != EOS:
            stream.append(EOS)
    return stream, starts


def _reference_windows(docs: list[Doc], order: np.ndarray, wl: int) -> list[tuple]:
    stream, starts = _reference_stream(docs, order)
    out = []
    for k in range(0, len(stream), wl):
        inside = {s - k for s in starts if k <= s < k + wl} | {0}
        out.append((tuple(stream[k : k + wl]), tuple(sorted(inside))))
    return out


def _as_tuple(w: Window) -> tuple:
    return (tuple(w.tokens.tolist()), tuple(w.sentence_starts.tolist()))


def _packed(indexed: IndexedDataset, **kw: object) -> PackedDataset:
    args: dict = {
        "documents": (0, indexed.num_documents),
        "window_length": 16,
        "num_samples": 50,
        "seed": 7,
        "eos_id": EOS,
        "name": "train",
    }
    args.update(kw)
    return PackedDataset(indexed, **args)


@pytest.fixture()
def corpus(tmp_path: Path) -> tuple[IndexedDataset, list[Doc]]:
    docs = _make_documents(0)
    return _write_corpus(tmp_path / "corpus_text_sentence", docs), docs


# ----------------------------------------------------------------------------- packing


@pytest.mark.parametrize(
    ("window_length", "num_samples"), [(16, 100), (7, 95), (1, 700), (4096, 3)]
)
def test_windows_equal_reference_every_epoch(corpus, window_length: int, num_samples: int) -> None:
    indexed, docs = corpus
    ds = _packed(indexed, window_length=window_length, num_samples=num_samples)
    assert len(ds) == num_samples
    W = ds.windows_per_epoch
    expected_tokens = len(_reference_stream(docs, np.arange(len(docs)))[0])
    assert ds.tokens_per_epoch == expected_tokens
    assert -(-expected_tokens // window_length) == W
    assert ds.num_epochs == -(-num_samples // W)
    for e in range(ds.num_epochs):
        order = ds.document_order(e)
        assert sorted(order.tolist()) == list(range(len(docs)))
        reference = _reference_windows(docs, order, window_length)
        assert len(reference) == W
        samples = range(e * W, min((e + 1) * W, num_samples))
        windows = [ds[i] for i in samples]
        for i, w in zip(samples, windows, strict=True):
            assert (w.epoch, w.index) == (e, i)
            assert w.tokens.dtype == np.int64 and w.sentence_starts.dtype == np.int64
        got = [_as_tuple(w) for w in windows]
        if len(got) == W:  # a full epoch: exactly the reference windows, each once
            assert sorted(got) == sorted(reference)
            tokens = collections.Counter(t for w in windows for t in w.tokens.tolist())
            assert tokens == collections.Counter(_reference_stream(docs, order)[0])
        else:  # the final partial epoch: distinct windows of that epoch
            remaining = collections.Counter(reference)
            for g in got:
                assert remaining[g] > 0
                remaining[g] -= 1
        short = [len(w.tokens) for w in windows if len(w.tokens) != window_length]
        assert len(short) <= 1 and all(0 < s < window_length for s in short)


def test_documents_given_as_array(corpus) -> None:
    indexed, docs = corpus
    subset = np.arange(1, len(docs), 3)
    ds = _packed(indexed, documents=subset, window_length=9, num_samples=40)
    assert sorted(ds.document_order(0).tolist()) == subset.tolist()
    reference = _reference_windows(docs, ds.document_order(0), 9)
    assert ds.windows_per_epoch == len(reference) < 40
    got = sorted(_as_tuple(ds[i]) for i in range(ds.windows_per_epoch))
    assert got == sorted(reference)


def test_epochs_and_seeds_change_the_order(corpus) -> None:
    indexed, _ = corpus
    ds = _packed(indexed, num_samples=200)
    assert ds.num_epochs >= 2
    assert not np.array_equal(ds.document_order(0), ds.document_order(1))
    other = _packed(indexed, num_samples=200, seed=8)
    assert not np.array_equal(ds.document_order(0), other.document_order(0))
    again = _packed(indexed, num_samples=200, cache_dir=str(indexed.prefix) + "_elsewhere")
    assert again.built  # built independently in a fresh cache dir ...
    for i in (0, 17, 199):  # ... and identical: the indices depend on the seed only
        assert _as_tuple(ds[i]) == _as_tuple(again[i])
    assert [_as_tuple(ds[i]) for i in range(20)] != [_as_tuple(other[i]) for i in range(20)]


def test_window_order_is_shuffled(corpus) -> None:
    indexed, docs = corpus
    ds = _packed(indexed, num_samples=30)
    in_stream_order = _reference_windows(docs, ds.document_order(0), 16)[:30]
    assert [_as_tuple(ds[i]) for i in range(30)] != in_stream_order


def test_index_bounds(corpus) -> None:
    indexed, _ = corpus
    ds = _packed(indexed, num_samples=10)
    assert _as_tuple(ds[-1]) == _as_tuple(ds[9]) and ds[-1].index == 9
    for bad in (10, -11):
        with pytest.raises(IndexError, match=f"sample {bad} out of range for 10 samples"):
            ds[bad]
    with pytest.raises(IndexError, match="epoch 5 out of range"):
        ds.document_order(5)


def test_bad_arguments(corpus) -> None:
    indexed, _ = corpus
    n = indexed.num_documents
    cases: list[tuple[dict[str, object], str]] = [
        ({"window_length": 0}, "PackedDataset 'train': window_length = 0 must be >= 1"),
        ({"num_samples": 0}, "PackedDataset 'train': num_samples = 0 must be >= 1"),
        ({"seed": -1}, "PackedDataset 'train': seed = -1 must be >= 0"),
        ({"documents": (3, 3)}, rf"documents \[3, 3\) is empty or outside \[0, {n}\)"),
        ({"documents": (0, n + 1)}, rf"documents \[0, {n + 1}\) is empty or outside"),
        ({"documents": np.array([0, n])}, rf"document ids must lie in \[0, {n}\)"),
        ({"documents": np.array([2, 2])}, "documents contains duplicate ids"),
        ({"documents": np.array([], dtype=np.int64)}, "non-empty 1-D integer array"),
    ]
    for kw, message in cases:
        with pytest.raises(ValueError, match=message):
            _packed(indexed, **kw)


# ----------------------------------------------------------------------------- splits


def _megatron_split(string: str, size: int) -> list[int]:
    """Megatron-LM's get_train_valid_test_split_, restated."""
    if "," in string:
        splits = [float(s) for s in string.split(",")]
    elif "/" in string:
        splits = [float(s) for s in string.split("/")]
    else:
        splits = [float(string)]
    while len(splits) < 3:
        splits.append(0.0)
    total = sum(splits)
    splits = [s / total for s in splits]
    index = [0]
    for k, s in enumerate(splits):
        index.append(index[k] + int(round(s * float(size))))  # noqa: RUF046
    diff = index[-1] - size
    return [index[0]] + [i - diff for i in index[1:]]


@pytest.mark.parametrize(
    "split", ["969,30,1", "1", "80/20", "1,1,1", "0,1,1", "98,2", "0.7,0.2,0.1"]
)
def test_split_documents_megatron_semantics(split: str) -> None:
    for size in range(0, 80):
        got = split_documents(size, parse_split(split))
        bounds = [got[0][0], got[0][1], got[1][1], got[2][1]]
        assert bounds[0] == 0 and bounds[-1] == size
        assert all(got[k][1] == got[k + 1][0] for k in range(2))
        assert all(b >= a for a, b in got)
        megatron = _megatron_split(split, size)
        if all(x >= 0 for x in megatron) and megatron == sorted(megatron):
            assert bounds == megatron, (size, split)


def test_split_documents_examples() -> None:
    assert split_documents(1000, (969, 30, 1)) == [(0, 969), (969, 999), (999, 1000)]
    assert split_documents(10, (1, 0, 0)) == [(0, 10), (10, 10), (10, 10)]
    assert split_documents(10, parse_split("8/2")) == [(0, 8), (8, 10), (10, 10)]
    assert split_documents(3, (0, 1, 1)) == [(0, 0), (0, 1), (1, 3)]  # Megatron: [0, -1, 1, 3]


# ----------------------------------------------------------------------------- cache


def _cache_files(ds: PackedDataset) -> dict[str, int]:
    """mtime_ns of every published cache file."""
    return {k: os.stat(p).st_mtime_ns for k, p in ds.cache_paths.items() if k != "lock"}


def test_cache_is_built_once_then_reused(corpus, caplog: pytest.LogCaptureFixture) -> None:
    indexed, _ = corpus
    caplog.set_level(logging.INFO, logger="megatron_glm.data.index_cache")
    first = _packed(indexed)
    assert first.built
    assert "building indices" in caplog.text and "built indices in" in caplog.text
    files = _cache_files(first)
    prefix_dir = os.path.dirname(indexed.prefix)
    assert all(os.path.dirname(p) == prefix_dir for p in first.cache_paths.values())
    caplog.clear()
    second = _packed(indexed)
    assert not second.built
    assert "reusing cached indices" in caplog.text and "building" not in caplog.text
    assert _cache_files(second) == files
    for name in ("_doc_order", "_sample_idx", "_shuffle"):
        arr = getattr(second, name)
        assert isinstance(arr.base, np.memmap) and not arr.flags.writeable  # a view of the map
        with pytest.raises(ValueError, match="read-only"):
            arr[0] = 0
    with open(first.cache_paths["meta"]) as f:
        record = json.load(f)
    assert record["key"]["format"] == FORMAT_VERSION
    assert record["key"]["window_length"] == 16 and record["key"]["seed"] == 7


@pytest.mark.parametrize(
    "change",
    [
        {"seed": 8},
        {"window_length": 17},
        {"num_samples": 51},
        {"eos_id": 2},
        {"documents": (0, 20)},
        {"documents": np.arange(0, 20)},
    ],
)
def test_changed_parameter_builds_new_cache(corpus, change: dict) -> None:
    indexed, _ = corpus
    base = _packed(indexed)
    changed = _packed(indexed, **change)
    assert changed.built
    assert changed.cache_paths["meta"] != base.cache_paths["meta"]
    assert os.path.exists(base.cache_paths["meta"])


def test_changed_data_file_builds_new_cache(tmp_path: Path) -> None:
    prefix = tmp_path / "c"
    docs = _make_documents(1)
    base = _packed(_write_corpus(prefix, docs), num_samples=100)
    edited = [list(map(list, d)) for d in docs]
    edited[3] = [[9, 9, 9]]  # same file sizes are possible; content differs
    changed = _packed(_write_corpus(prefix, edited), num_samples=100)
    assert changed.built and changed.cache_paths["meta"] != base.cache_paths["meta"]
    reference = _reference_windows(edited, changed.document_order(0), 16)
    got = sorted(_as_tuple(changed[i]) for i in range(changed.windows_per_epoch))
    assert got == sorted(reference)


def test_foreign_or_broken_cache_is_rebuilt(corpus, caplog: pytest.LogCaptureFixture) -> None:
    indexed, _ = corpus
    first = _packed(indexed)
    expected = [_as_tuple(first[i]) for i in range(10)]
    meta = first.cache_paths["meta"]
    with open(meta) as f:
        record = json.load(f)
    record["key"]["seed"] = 123  # a cache claiming other parameters under this name
    with open(meta, "w") as f:
        json.dump(record, f)
    rebuilt = _packed(indexed)
    assert rebuilt.built and "built for another key" in caplog.text
    with open(first.cache_paths["shuffle"], "r+b") as f:  # truncate an array file
        f.truncate(100)
    rebuilt = _packed(indexed)
    assert rebuilt.built and "unreadable" in caplog.text
    assert [_as_tuple(rebuilt[i]) for i in range(10)] == expected


def _construct_in_child(prefix: str, barrier: Any, queue: Any) -> None:
    indexed = IndexedDataset(prefix)
    barrier.wait()
    ds = _packed(indexed, num_samples=5000, window_length=3)
    queue.put((ds.built, _as_tuple(ds[4321])))


def test_concurrent_constructions_build_once(corpus) -> None:
    indexed, _ = corpus
    ctx = mp.get_context("fork")
    n = 4
    barrier, queue = ctx.Barrier(n), ctx.Queue()
    procs = [
        ctx.Process(target=_construct_in_child, args=(indexed.prefix, barrier, queue))
        for _ in range(n)
    ]
    for p in procs:
        p.start()
    results = [queue.get(timeout=60) for _ in range(n)]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert sorted(built for built, _ in results) == [False] * (n - 1) + [True]
    assert len({window for _, window in results}) == 1
    leftovers = [f for f in os.listdir(os.path.dirname(indexed.prefix)) if ".tmp" in f]
    assert leftovers == []


def test_token_ids_outside_the_vocabulary_never_reach_a_batch(tmp_path: Path) -> None:
    """With ``vocab_size`` every window is checked: the one holding an id past the vocabulary
    raises a ValueError naming the .bin, the document, the token in it and the sample (not an
    IndexError in the embedding); the other windows are served; without it nothing is checked."""
    docs: list[Doc] = [[[2, 3, 4], [5]], [[6, 7]], [[8, 99, 9]], [[10, 11]]]
    indexed = _write_corpus(tmp_path / "bad", docs)
    # 15 packed tokens (each document + eos), windows of 4: exactly one epoch of 4 samples
    built, _, _ = build_pretrain_datasets(
        [indexed.prefix], None, (1.0, 0.0, 0.0), 4, (4, 0, 0), 7, EOS, None, vocab_size=50
    )
    packed = _packed(indexed, window_length=4, num_samples=4, vocab_size=50)
    for ds, name in [(packed, "train"), (built, "train:bad")]:
        assert ds is not None
        raised = []
        for i in range(4):
            try:
                window = ds[i]
            except ValueError as e:
                raised.append(i)
                assert str(e) == (
                    f"{indexed.data_path}: token id 99 outside the vocabulary [0, 50) in document "
                    f"2 (its token 1), sample {i} of {name!r}"
                )
            else:
                assert int(window.tokens.max()) < 50
        assert len(raised) == 1
    unchecked = _packed(indexed, window_length=4, num_samples=4)
    assert max(int(unchecked[i].tokens.max()) for i in range(4)) == 99
