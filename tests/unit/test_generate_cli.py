"""Loading a trained GLM for decoding (megatron_glm.inference) and ``tools/generate.py``.

Checkpoints are written with :func:`~megatron_glm.training.checkpoint.write_checkpoint` at the
layouts training writes (TP shards, DeepSpeed's per-layer pipeline files), from one model built
with ``build_model``; every load is compared with that model's own tensors, and every fill from
the CLI with :func:`megatron_glm.generation.fill_blanks` called on that model directly.
"""

from __future__ import annotations

import io
import json
import sys
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch

from megatron_glm.config import ModelConfig
from megatron_glm.data.tokenizer import GLMTokenizer
from megatron_glm.generation import GenerationConfig, fill_blanks
from megatron_glm.hf.export import export_to_hf
from megatron_glm.inference import (
    FullWeights,
    build_for_inference,
    checkpoint_weights,
    load_for_inference,
)
from megatron_glm.model import GLMModel, build_model, tensor_parallel_layout
from megatron_glm.parallel.dims import ParallelDims
from megatron_glm.training.checkpoint import reshard_checkpoint, split_state, write_checkpoint

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tools"))

import generate  # noqa: E402

TEXTS = [
    "The [MASK] module provides functions for working with files.",
    "Return the [MASK] of the list, and raise [MASK] when it is empty.",
    "A short [MASK].",
    "Iterate over [MASK] lines of the [MASK] in [MASK] order.",
]
FLAGS = ["--max-new-tokens", "5", "--batch-size", "3", "--no-progress"]


def tiny_cfg() -> ModelConfig:
    """A 2-layer model whose logits are far from uniform (init std 0.2): a greedy token is not
    decided by rounding noise, so tp 2 and tp 1 must pick the same one."""
    return ModelConfig(
        num_layers=2,
        hidden_size=32,
        num_attention_heads=4,
        max_position_embeddings=128,
        init_method_std=0.2,
        hidden_dropout=0.0,
        attention_dropout=0.0,
    )


def write_run(root: Path, model: GLMModel, tokenizer: Path, *, tp: int = 1, pp: int = 1) -> Path:
    """``root/global_step3`` + ``latest`` as a (tp, pp) run writes them (config snapshot too)."""
    tag = root / "global_step3"
    tag.mkdir(parents=True)
    config = {"model": asdict(model.cfg), "data": {"tokenizer_model": str(tokenizer)}}
    base = {"iteration": 3, "consumed_samples": 24, "config": config}
    full = {k: v.detach().clone() for k, v in model.state_dict().items()}
    write_checkpoint(
        full, tensor_parallel_layout(model.cfg), tag, tp=tp, pp=pp, base=base, marker={}
    )
    (root / "latest").write_text("global_step3")
    return root


def write_prompts(path: Path, texts: list[str]) -> Path:
    with path.open("w") as f:
        for i, text in enumerate(texts):
            f.write(json.dumps({"id": i, "text": text}) + "\n")
    return path


@pytest.fixture(scope="module")
def model(tiny_tokenizer: GLMTokenizer) -> GLMModel:
    return build_model(tiny_cfg(), vocab_size=tiny_tokenizer.padded_vocab_size, seed=3).eval()


@pytest.fixture(scope="module")
def ckpt(
    model: GLMModel, tiny_tokenizer_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    return write_run(tmp_path_factory.mktemp("gen") / "ckpt", model, tiny_tokenizer_model)


def _generate(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = generate.main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_every_saved_layout_loads_the_same_weights(
    model: GLMModel, tiny_tokenizer_model: Path, tmp_path: Path
) -> None:
    want = model.state_dict()
    for tp, pp in [(1, 1), (2, 1), (1, 2), (2, 2)]:
        root = write_run(tmp_path / f"tp{tp}pp{pp}", model, tiny_tokenizer_model, tp=tp, pp=pp)
        loaded = load_for_inference(load=root)
        got = loaded.model.state_dict()
        assert list(got) == list(want), (tp, pp)
        assert all(torch.equal(got[k], want[k]) for k in want), (tp, pp)
        assert not loaded.model.training
        assert loaded.tokenizer.model_path == tiny_tokenizer_model


def test_a_tp_rank_gets_its_shard_of_the_merged_state(
    model: GLMModel, tiny_tokenizer_model: Path, tmp_path: Path
) -> None:
    weights = checkpoint_weights(write_run(tmp_path / "c", model, tiny_tokenizer_model, pp=2))
    want = split_state(model.state_dict(), tensor_parallel_layout(model.cfg), 2)[1]
    shard = build_for_inference(weights, dims=ParallelDims(world_size=2, tp=2, rank=1))
    got = shard.state_dict()
    assert sorted(got) == sorted(want)
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert got["layers.0.word_embeddings.weight"].shape[0] == model.vocab_size // 2


def test_a_tokenizer_too_small_for_the_model_is_refused(
    model: GLMModel, tiny_tokenizer_model: Path, tmp_path: Path
) -> None:
    small = replace(model.cfg, vocab_size=256)
    other = build_model(small, seed=1)
    root = write_run(tmp_path / "c", other, tiny_tokenizer_model)
    with pytest.raises(ValueError, match=r"has 1500 tokens but the model .* has 256 vocabulary"):
        load_for_inference(load=root)


def test_generate_file_end_to_end(
    model: GLMModel,
    tiny_tokenizer: GLMTokenizer,
    ckpt: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    prompts = write_prompts(tmp_path / "in.jsonl", TEXTS)
    out = tmp_path / "out.jsonl"
    code, stdout, err = _generate(
        capsys, "--load", str(ckpt), "--input", str(prompts), "--output", str(out), *FLAGS
    )
    assert code == 0, err
    want = fill_blanks(model, tiny_tokenizer, TEXTS, GenerationConfig(max_new_tokens=5))
    rows = _rows(out)
    assert [r["id"] for r in rows] == [0, 1, 2, 3]  # input fields kept, in order
    assert [r["text"] for r in rows] == TEXTS
    assert [r["fills"] for r in rows] == [w.fills for w in want]
    assert [r["filled"] for r in rows] == [w.text for w in want]
    assert [len(r["fills"]) for r in rows] == [1, 2, 1, 3]
    tokens = sum(w.new_tokens for w in want)
    assert stdout.startswith(f"{out}: 4 rows, {tokens} new tokens in ")


def test_strategy_flags_reach_the_decoder(
    model: GLMModel,
    tiny_tokenizer: GLMTokenizer,
    ckpt: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    prompts = write_prompts(tmp_path / "in.jsonl", TEXTS[:2])
    flags = ["--num-beams", "3", "--length-penalty", "0.5", "--no-repeat-ngram-size", "2"]
    flags += ["--min-new-tokens", "2", "--repetition-penalty", "1.3"]
    out = tmp_path / "out.jsonl"
    code, _, err = _generate(
        capsys, "--load", str(ckpt), "--input", str(prompts), "--output", str(out), *FLAGS, *flags
    )
    assert code == 0, err
    config = GenerationConfig(
        max_new_tokens=5,
        num_beams=3,
        length_penalty=0.5,
        no_repeat_ngram_size=2,
        min_new_tokens=2,
        repetition_penalty=1.3,
    )
    want = fill_blanks(model, tiny_tokenizer, TEXTS[:2], config)
    assert [r["fills"] for r in _rows(out)] == [w.fills for w in want]
    code, _, err = _generate(capsys, "--load", str(ckpt), "--interactive", "--top-p", "1.5")
    assert code == 2 and "top_p must be in (0, 1]" in err


def test_bad_rows_are_named_by_file_and_line(
    ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out.jsonl"
    bad = tmp_path / "bad.jsonl"
    for lines, want in [
        ([json.dumps({"text": TEXTS[0]}), "{not json"], f"{bad}:2: invalid JSON"),
        ([json.dumps({"text": TEXTS[0]}), json.dumps({"txt": "x"})], f"{bad}:2: missing key"),
        ([json.dumps({"text": t}) for t in [TEXTS[0], "no blank", TEXTS[2]]], f"{bad}:2: "),
    ]:
        bad.write_text("\n".join(lines) + "\n")
        code, _, err = _generate(
            capsys, "--load", str(ckpt), "--input", str(bad), "--output", str(out), *FLAGS
        )
        assert code == 2 and want in err, err
        assert not out.exists()  # nothing half-written


def test_pp2_checkpoint_generates_as_its_merged_form(
    model: GLMModel,
    tiny_tokenizer_model: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    pp2 = write_run(tmp_path / "pp2", model, tiny_tokenizer_model, tp=2, pp=2)
    layout = tensor_parallel_layout(model.cfg)
    reshard_checkpoint(pp2, tmp_path / "merged", 1, layout, pp=1, optimizer=False)
    prompts = write_prompts(tmp_path / "in.jsonl", TEXTS)
    outs = []
    for src in (pp2, tmp_path / "merged"):
        outs.append(tmp_path / f"{src.name}.jsonl")
        code, _, err = _generate(
            capsys, "--load", str(src), "--input", str(prompts), "--output", str(outs[-1]), *FLAGS
        )
        assert code == 0, err
    assert _rows(outs[0]) == _rows(outs[1])
    assert any(f for r in _rows(outs[0]) for f in r["fills"])  # not all empty


def test_hf_export_fills_like_the_checkpoint(
    ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("transformers")
    export_to_hf(ckpt, tmp_path / "hf")
    prompts = write_prompts(tmp_path / "in.jsonl", TEXTS)
    outs = []
    for source in (["--load", str(ckpt)], ["--hf", str(tmp_path / "hf")]):
        outs.append(tmp_path / f"out{len(outs)}.jsonl")
        code, _, err = _generate(
            capsys, *source, "--input", str(prompts), "--output", str(outs[-1]), *FLAGS
        )
        assert code == 0, err
    assert _rows(outs[0]) == _rows(outs[1])


def test_interactive_reads_stdin(
    model: GLMModel,
    tiny_tokenizer: GLMTokenizer,
    ckpt: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{TEXTS[1]}\n\nno blank here\n{TEXTS[0]}\n"))
    code, stdout, err = _generate(capsys, "--load", str(ckpt), "--interactive", *FLAGS)
    assert code == 0, err
    want = fill_blanks(model, tiny_tokenizer, [TEXTS[1], TEXTS[0]], GenerationConfig(5))
    expected = []
    for result in want:
        expected.append(result.text)
        expected += [f"  [{i}] {fill!r}" for i, fill in enumerate(result.fills, start=1)]
    assert stdout.splitlines() == expected
    assert err.count("error: ") == 1  # the text without a blank, and the session went on


def test_vocab_rows_tp_does_not_divide_are_padded_with_the_last_row(tmp_path: Path) -> None:
    cfg = replace(
        tiny_cfg(), hidden_size=24, ffn_hidden_size=96, num_attention_heads=3, vocab_size=100
    )
    model = build_model(cfg, seed=2)
    full = {k: v.detach().clone() for k, v in model.state_dict().items()}
    weights = FullWeights(cfg, full, None, where="here")
    last = build_for_inference(weights, dims=ParallelDims(world_size=3, tp=3, rank=2))
    rows = last.state_dict()["layers.0.word_embeddings.weight"]
    emb = full["layers.0.word_embeddings.weight"]
    assert rows.shape[0] == 34  # 100 rows -> 102, a third each
    assert torch.equal(rows[:32], emb[68:100])
    assert torch.equal(rows[32], emb[99]) and torch.equal(rows[33], emb[99])
