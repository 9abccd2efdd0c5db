"""Collation, Megatron-order sampling by data-parallel rank, DataLoader determinism and resume."""

from __future__ import annotations

import re
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import torch
from infilling_reference import parse_row, random_window

from megatron_glm.config import ObjectiveConfig
from megatron_glm.data.blank_infilling import BlankInfilling, SpecialIds
from megatron_glm.data.dataset_builder import build_pretrain_datasets
from megatron_glm.data.indexed import IndexedDatasetBuilder
from megatron_glm.data.loader import (
    GLMPretrainDataset,
    PretrainingSampler,
    build_dataloader,
    collate,
)
from megatron_glm.data.tokenizer import GLMTokenizer

IDS = SpecialIds(mask=3, smask=4, gmask=5, sop=6, eop=7, pad=2, eos=2)
S = 64


def _dataset(n: int = 40, objective: str | None = None) -> GLMPretrainDataset:
    bi = BlankInfilling(ObjectiveConfig(), seq_length=S, ids=IDS, seed=3)
    windows = [random_window(bi.window_length, i, mean_doc=20) for i in range(n)]
    return GLMPretrainDataset(windows, bi, objective)


def test_collate_follows_the_batch_contract() -> None:
    ds = _dataset(5)
    batch = collate([ds[i] for i in range(3)])
    want = {
        "tokens": (torch.int64, (3, S)),
        "targets": (torch.int64, (3, S)),
        "loss_mask": (torch.float32, (3, S)),
        "position_ids": (torch.int64, (3, 2, S)),
        "sep": (torch.int64, (3,)),
        "valid_len": (torch.int64, (3,)),
        "objective": (torch.int64, (3,)),
    }
    assert {k: (v.dtype, tuple(v.shape)) for k, v in batch.items()} == want
    for b in range(3):
        row = ds[b]
        for key in want:
            assert np.array_equal(batch[key][b].numpy(), np.asarray(row[key]))
    with pytest.raises(ValueError, match="collate: empty list of rows"):
        collate([])
    rows = [dict(ds[i]) for i in range(3)]
    rows[2]["objective"] = np.int64(3)  # one past "document"
    with pytest.raises(ValueError) as exc:
        collate(rows)
    assert str(exc.value) == (
        "collate: row 2 has objective id 3, not in [0, 3) (span, sentence, document)"
    )


def test_getitems_matches_getitem() -> None:
    ds = _dataset(12)
    rows = ds.__getitems__([3, 0, 7, 11])
    for i, row in zip([3, 0, 7, 11], rows, strict=True):
        single = ds[i]
        assert all(np.array_equal(row[k], single[k]) for k in single)


def test_forced_objective_dataset() -> None:
    ds = _dataset(20, objective="document")
    assert len(ds) == 20
    assert all(int(ds[i]["objective"]) == 2 for i in range(20))
    parse_row(ds[0], IDS, S)


def _batches(total: int, consumed: int, mbs: int, rank: int, dp: int, drop: bool) -> list:
    return list(
        PretrainingSampler(
            total,
            consumed_samples=consumed,
            micro_batch_size=mbs,
            dp_rank=rank,
            dp_size=dp,
            drop_last=drop,
        )
    )


def test_sampler_splits_global_micro_batches_by_rank() -> None:
    got = [_batches(25, 0, 2, r, 3, True) for r in range(3)]
    for r in range(3):
        assert got[r] == [[6 * k + 2 * r, 6 * k + 2 * r + 1] for k in range(4)]
    assert len(PretrainingSampler(25, consumed_samples=0, micro_batch_size=2, dp_rank=0,
                                  dp_size=3)) == 4  # fmt: skip
    # keeping the tail: rank 0 gets [24], the others nothing for it
    tails = [_batches(25, 0, 2, r, 3, False) for r in range(3)]
    assert tails[0][-1] == [24] and tails[1] == got[1] and tails[2] == got[2]
    for r in range(3):
        sampler = PretrainingSampler(
            25, consumed_samples=0, micro_batch_size=2, dp_rank=r, dp_size=3, drop_last=False
        )
        assert len(sampler) == len(tails[r])


def test_sampler_resumes_from_consumed_samples() -> None:
    full = _batches(50, 0, 2, 1, 2, True)
    resumed = _batches(50, 12, 2, 1, 2, True)  # 3 global micro-batches of 4 consumed
    assert resumed == full[3:]


def test_sampler_rejects_bad_arguments() -> None:
    kw: dict[str, Any] = {"micro_batch_size": 2, "dp_rank": 0, "dp_size": 1}
    with pytest.raises(ValueError, match=re.escape("consumed_samples=10 must be in [0, 10)")):
        PretrainingSampler(10, consumed_samples=10, **kw)
    with pytest.raises(ValueError, match=re.escape("need 0 <= dp_rank < dp_size, got 2, 2")):
        PretrainingSampler(10, consumed_samples=0, micro_batch_size=1, dp_rank=2, dp_size=2)
    with pytest.raises(ValueError, match="dataset is empty"):
        PretrainingSampler(0, consumed_samples=0, **kw)


def _write_corpus(prefix: Path) -> None:
    """60 documents of 1-6 sentences of 3-30 tokens, each ending with eos (--append-eod)."""
    rng = np.random.default_rng(0)
    with IndexedDatasetBuilder(prefix, dtype=np.uint16) as b:
        for _ in range(60):
            sents = [
                rng.integers(100, 1000, rng.integers(3, 30)) for _ in range(rng.integers(1, 7))
            ]
            sents[-1] = np.r_[sents[-1], IDS.eos]
            b.add_document(sents)


def _collect(loader: torch.utils.data.DataLoader) -> list[dict[str, torch.Tensor]]:
    return [dict(batch) for batch in loader]


def test_dataloader_identical_across_workers_and_after_resume(tmp_path: Path) -> None:
    prefix = tmp_path / "corpus"
    _write_corpus(prefix)
    bi = BlankInfilling(ObjectiveConfig(), seq_length=S, ids=IDS, seed=1234)
    train, _, _ = build_pretrain_datasets(
        [str(prefix)],
        None,
        (1.0, 0.0, 0.0),
        bi.window_length,
        (96, 0, 0),
        1234,
        IDS.eos,
        str(tmp_path),
    )
    ds = GLMPretrainDataset(train, bi)
    kw: dict[str, Any] = {"micro_batch_size": 4, "dp_size": 2, "seed": 1234}
    runs = {}
    for workers in (0, 2):
        runs[workers] = [
            _collect(build_dataloader(ds, dp_rank=r, consumed_samples=0, num_workers=workers, **kw))
            for r in range(2)
        ]
    resumed = _collect(build_dataloader(ds, dp_rank=1, consumed_samples=40, num_workers=2, **kw))
    assert len(runs[0][0]) == len(runs[0][1]) == 12
    for r in range(2):
        for a, b in zip(runs[0][r], runs[2][r], strict=True):
            assert all(torch.equal(a[k], b[k]) for k in a)
    assert len(resumed) == 7  # 40 consumed = 5 global micro-batches of 8
    for a, b in zip(runs[0][1][5:], resumed, strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)
    # rank 1's first batch holds samples 4..7, rebuilt directly
    for j in range(4):
        row = ds[4 + j]
        assert np.array_equal(runs[0][1][0]["tokens"][j].numpy(), row["tokens"])
    # every real window gives a row that passes the oracle
    for i in range(0, 96, 7):
        parse_row(ds[i], IDS, S)


def _write_text_corpus(prefix: Path, tok: GLMTokenizer) -> None:
    texts = [
        "The quick brown fox jumps over the lazy dog. It was not amused. Then it slept.",
        "Return the number of items in a container. Raises an error when it is empty.",
        "A short one.",
    ] * 4
    with IndexedDatasetBuilder(prefix, dtype=np.uint16) as b:
        for text in texts:
            sents = [tok.encode(s.strip() + ".") for s in text.split(".") if s.strip()]
            sents[-1] = [*sents[-1], tok.eos_id]
            b.add_document(sents)


def _load_tool(name: str) -> ModuleType:
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "tools" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"tool_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_inspect_samples_tool(
    tmp_path: Path,
    tiny_tokenizer: GLMTokenizer,
    tiny_tokenizer_model: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import json

    prefix = tmp_path / "text"
    _write_text_corpus(prefix, tiny_tokenizer)
    tool = _load_tool("inspect_samples")
    common = ["--data-prefix", str(prefix), "--tokenizer-model", str(tiny_tokenizer_model)]
    common += ["--seq-length", "48", "--cache-dir", str(tmp_path)]
    assert tool.main([*common, "--num-samples", "3", "--objective", "sentence", "--json"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3
    ids = SpecialIds.from_tokenizer(tiny_tokenizer)
    for i, line in enumerate(lines):
        obj = json.loads(line)
        assert obj["sample"] == i and obj["objective"] == "sentence"
        assert set(obj) == {"sample", "tokens", "targets", "loss_mask", "position_ids", "sep",
                            "valid_len", "objective"}  # fmt: skip
        assert len(obj["tokens"]) == 48 and np.asarray(obj["position_ids"]).shape == (2, 48)
        row: dict[str, Any] = {k: np.asarray(v) for k, v in obj.items() if k != "sample"}
        row["objective"] = 1
        parsed = parse_row(row, ids, 48)
        assert all(m == ids.smask for m in parsed.mask_ids)
    assert tool.main([*common, "--num-samples", "2", "--objective", "span"]) == 0
    out = capsys.readouterr().out
    assert out.count("objective=span sep=") == 2 and "[MASK]" in out and "part B" in out
    with pytest.raises(SystemExit):
        tool.main(["--help"])
    help_lines = capsys.readouterr().out.splitlines()  # the example keeps its two lines
    first = help_lines.index(
        "    python tools/inspect_samples.py --data-prefix data/demo/demo_text_sentence \\"
    )
    assert help_lines[first + 1].startswith("        --tokenizer-model data/demo/tok.model ")
    bad = ["--data-prefix", str(tmp_path / "missing"), *common[2:], "--num-samples", "1"]
    assert tool.main(bad) == 2
    assert "inspect_samples: error:" in capsys.readouterr().err
