"""The demo's fill tool end to end, and the data benchmarks at tiny sizes (so they cannot rot)."""

from __future__ import annotations

import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_glm.config import load_config
from megatron_glm.data.indexed import IndexedDatasetBuilder
from megatron_glm.data.tokenizer import GLMTokenizer
from megatron_glm.model import build_model

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tools"))

import fill_blank  # noqa: E402


def _corpus(prefix: Path, tok: GLMTokenizer) -> None:
    """30 one-sentence documents; with split 1,1,1 the last 10 are the held-out test split."""
    with IndexedDatasetBuilder(str(prefix), dtype=np.uint16) as builder:
        for i in range(30):
            ids = tok.encode(f"Document {i} says that the quick brown fox jumps over the dog.")
            builder.add_document([[*ids, tok.eos_id]])


@pytest.fixture()
def run_files(
    tmp_path: Path, tiny_tokenizer_model: Path, tiny_tokenizer: GLMTokenizer
) -> list[str]:
    """A config + checkpoint in DeepSpeed's layout (tag dir, mp_rank_00 file, ``latest``)."""
    _corpus(tmp_path / "corpus", tiny_tokenizer)
    overrides = [
        f"data.data_path=[{tmp_path / 'corpus'}]",
        f"data.tokenizer_model={tiny_tokenizer_model}",
        "data.split=1,1,1",
        f"checkpoint.save={tmp_path / 'ckpt'}",
        "model.num_layers=1",
        "model.hidden_size=32",
    ]
    cfg = load_config(None, overrides)
    model = build_model(cfg.model, vocab_size=tiny_tokenizer.padded_vocab_size, seed=1)
    (tmp_path / "ckpt" / "global_step1").mkdir(parents=True)
    blob = {"module": model.state_dict()}
    torch.save(blob, tmp_path / "ckpt" / "global_step1" / "mp_rank_00_model_states.pt")
    (tmp_path / "ckpt" / "latest").write_text("global_step1")
    (tmp_path / "run.yaml").write_text("{}\n")
    return ["--config", str(tmp_path / "run.yaml"), *overrides]


def test_fill_blank_tool_masks_a_held_out_sentence(
    run_files: list[str], tiny_tokenizer: GLMTokenizer, capsys: pytest.CaptureFixture[str]
) -> None:
    assert fill_blank.main([*run_files, "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("held-out sentence: 'Document 20 says")  # first test-split document
    assert out[1].startswith("input:") and "[MASK]" in out[1]
    assert out[2].startswith("blank:") and out[3].startswith("fill:")
    assert out[4].startswith("beam 4:")
    assert [line.split(":")[0] for line in out].count("held-out sentence") == 3
    assert out[12].count(" | ") == 1 and out[13].count(" | ") == 1  # two blanks, two fills
    # 20 held-out sentences (test then validation split); the baseline answers the most
    # frequent word piece of the 10 training documents' texts
    assert out[15].startswith("single-token blanks in 20 held-out sentences: model top-1 ")
    counts = Counter(
        tiny_tokenizer.id_to_piece(t)
        for i in range(10)
        for t in tiny_tokenizer.encode(
            f"Document {i} says that the quick brown fox jumps over the dog."
        )
        if tiny_tokenizer.decode([t]).strip()
    )
    top = max(counts.values())
    assert re.search(r"\(always '(.*)'\)$", out[15]).group(1) in {
        k for k, v in counts.items() if v == top
    }
    assert len(out) == 16


def test_blank_accuracy_guesses_are_the_forward_argmax(
    run_files: list[str], tiny_tokenizer: GLMTokenizer
) -> None:
    """top1 (the cached decoder, batched) against one uncached forward per blank."""
    cfg = load_config(run_files[1], run_files[2:])
    loaded = fill_blank._load(cfg, None)
    excluded = fill_blank.not_words(tiny_tokenizer)
    blanks = fill_blank.single_token_blanks(
        tiny_tokenizer, fill_blank.take_sentences(cfg, tiny_tokenizer, 20, raw=True), excluded
    )
    banned = torch.tensor(sorted(excluded | {tiny_tokenizer.eop_id}))
    want = []
    for row, p in zip(blanks.rows, blanks.positions, strict=True):
        sep = len(row)
        tokens = torch.tensor([[*row, tiny_tokenizer.sop_id]])
        positions = torch.tensor([[[*range(sep), p], [0] * sep + [1]]])
        with torch.no_grad():
            hidden = loaded.model(tokens, positions, torch.tensor([sep]), torch.tensor([sep + 1]))
            logits = loaded.model.logits(hidden[0, -1])[: tiny_tokenizer.vocab_size]
        logits[banned] = -torch.inf
        want.append(int(logits.argmax()))
    assert len(want) == 20
    assert fill_blank.top1(loaded.model, tiny_tokenizer, blanks, excluded) == want


def test_fill_blank_tool_names_bad_input(
    run_files: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert fill_blank.main([*run_files, "--text", "no blank here"]) == 2
    assert "--text: row 0: no [MASK], [sMASK] or [gMASK]" in capsys.readouterr().err
    assert fill_blank.main([*run_files, "--load", str(tmp_path / "nowhere")]) == 2
    assert "no 'latest' file" in capsys.readouterr().err


def test_fill_blank_tool_loads_the_tag_asked_for(
    run_files: list[str],
    tiny_tokenizer: GLMTokenizer,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``--tag`` picks an older checkpoint than ``latest``, as ``tools/generate.py``'s does."""
    cfg = load_config(run_files[1], run_files[2:])
    newer = build_model(cfg.model, vocab_size=tiny_tokenizer.padded_vocab_size, seed=2)
    (tmp_path / "ckpt" / "global_step2").mkdir()
    torch.save(
        {"module": newer.state_dict()},
        tmp_path / "ckpt" / "global_step2" / "mp_rank_00_model_states.pt",
    )
    (tmp_path / "ckpt" / "latest").write_text("global_step2")
    older = torch.load(tmp_path / "ckpt" / "global_step1" / "mp_rank_00_model_states.pt")
    picked = {tag: fill_blank._load(cfg, None, tag) for tag in ("global_step1", None)}
    for tag, want in (("global_step1", older["module"]), (None, newer.state_dict())):
        got = picked[tag].model.state_dict()
        assert all(torch.equal(got[k], want[k]) for k in want), tag
    assert picked["global_step1"].where.endswith("global_step1")
    assert fill_blank.main([*run_files, "--tag", "global_step9", "--text", "A [MASK] b."]) == 2
    assert "no checkpoint tag 'global_step9'" in capsys.readouterr().err


def test_bench_collator_smoke() -> None:
    cmd = [sys.executable, "tools/bench/bench_collator.py", "--rows", "8", "--ref-rows", "4"]
    cmd += ["--repeats", "1", "--batch-sizes", "4"]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=True).stdout
    table = out[out.index("blank infilling rows/s") :].splitlines()
    assert len(table) == 2 + 8  # title, header, 2 lengths x 4 tasks


def test_bench_preprocess_smoke(demo_corpus_path: Path, tiny_tokenizer_model: Path) -> None:
    cmd = [sys.executable, "tools/bench/bench_preprocess.py", "--input", str(demo_corpus_path)]
    cmd += ["--tokenizer-model", str(tiny_tokenizer_model), "--min-mb", "0.5"]
    cmd += ["--repeats", "1", "--stages", "1", "--workers", "1", "2"]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert "compiled helpers: yes" in out
    assert "flatten ids (compiled; used)" in out and "parse (json module, before)" in out
    rows = [line.split() for line in out.splitlines() if line.strip()[:1] in {"1", "2"}]
    assert [r[0] for r in rows[-2:]] == ["1", "2"]
    assert all(float(r[3]) > 0 for r in rows[-2:])  # the ratio column
