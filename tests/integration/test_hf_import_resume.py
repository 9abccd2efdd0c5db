"""``pretrain`` resumes from a checkpoint imported from the Hugging Face format.

The original is a fresh one-process run: its weights before step 1 are ``build_model`` of the
run's config and seed. Those weights go through our checkpoint, ``to-hf`` and ``from-hf``; a run
resumed from the import (iteration 0, fresh Adam) must log step 1's loss and gradient norm as the
original does, and save the same weights after the step. Dropout is off: the resumed run's RNG
streams are freshly seeded, not the original's. So that the resumed run cannot pass by building
the same seed's weights instead of loading, the imported model's position rows beyond the
sequence length (never read at seq_length 64) are shifted: they must come out shifted.
"""

from __future__ import annotations

import os
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from megatron_glm.config import load_config
from megatron_glm.data.tokenizer import load_tokenizer
from megatron_glm.hf.export import export_to_hf
from megatron_glm.hf.import_hf import import_from_hf
from megatron_glm.model import build_model, tensor_parallel_layout
from megatron_glm.training.checkpoint import read_full_state
from tests.integration.test_pretrain_cli import _one_process, _run_yaml
from tests.unit.test_hf_export import _checkpoint

POSITIONS = "layers.0.position_embeddings.weight"
S = 64  # data.seq_length of _run_yaml


def _step_fields(log: str) -> str:
    """``loss ... | lr ... | grad norm ...`` of the ``step 1/1`` line."""
    line = next(x for x in log.splitlines() if x.startswith("step 1/1 |"))
    return " | ".join(line.split(" | ")[2:5])


@pytest.mark.slow
def test_pretrain_resumes_from_import(tmp_path: Path, tiny_corpus: tuple[str, str]) -> None:
    run = _run_yaml(tmp_path, *tiny_corpus, train_iters=1)
    overrides = ["model.hidden_dropout=0", "model.attention_dropout=0", "data.num_workers=0"]
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cfg = load_config(run, overrides)
    vocab = load_tokenizer(cfg.data.tokenizer_model).padded_vocab_size
    model = build_model(replace(cfg.model, vocab_size=vocab), seed=cfg.train.seed)
    unused = model.state_dict()[POSITIONS][S:]
    with torch.no_grad():
        unused.add_(1.0)  # rows no step-1 forward reads (positions < seq_length)
    _checkpoint(tmp_path / "ours", model)
    export_to_hf(tmp_path / "ours", tmp_path / "hf")
    import_from_hf(tmp_path / "hf", tmp_path / "imported", run_config=run)

    args = ["--config", str(run), *overrides, "checkpoint.save_interval=1"]
    fresh = _one_process([*args, f"checkpoint.save={tmp_path / 'a'}"], env, tmp_path)
    assert fresh.returncode == 0, (fresh.stdout + fresh.stderr)[-4000:]
    load = f"checkpoint.load={tmp_path / 'imported'}"
    resumed = _one_process([*args, load, f"checkpoint.save={tmp_path / 'b'}"], env, tmp_path)
    log = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, log[-4000:]
    assert "optimizer restarts" in log
    print("step 1:", _step_fields(fresh.stdout), "||", _step_fields(resumed.stdout))
    assert _step_fields(fresh.stdout) == _step_fields(resumed.stdout)
    assert re.search(r"loss \d+\.\d{4}", _step_fields(fresh.stdout))
    layout = tensor_parallel_layout(model.cfg)
    a = read_full_state(tmp_path / "a" / "global_step1", layout)
    b = read_full_state(tmp_path / "b" / "global_step1", layout)
    assert sorted(a) == sorted(b)
    for name in a:
        if name != POSITIONS:
            assert torch.equal(a[name], b[name]), name
    assert torch.equal(a[POSITIONS][:S], b[POSITIONS][:S])
    assert (b[POSITIONS][S:] - a[POSITIONS][S:]).abs().min() > 0.5  # loaded, not re-initialised
    dense = "layers.1.mlp.dense_4h_to_h.weight"
    assert not torch.equal(a[dense], model.state_dict()[dense])  # the step changed the weights


@pytest.mark.slow
def test_pretrain_on_an_imported_wordpiece_model(tmp_path: Path, demo_corpus_path: Path) -> None:
    """A THUDM-layout folder with its WordPiece tokenizer: the import copies the tokenizer,
    ``tools/preprocess_data.py`` tokenizes a corpus with the copy, and ``pretrain`` on that data
    (the run's model section is the checkpoint's snapshot) resumes from the import and takes a
    step with a finite loss."""
    import json
    import math
    import subprocess
    import sys

    import yaml
    from safetensors.torch import save_file

    from megatron_glm.training.checkpoint import saved_config
    from tests.unit.test_hf_thudm_reference import thudm_config, thudm_weights
    from tests.unit.test_hf_tokenizer import _demo_texts, _train_hf_folder

    texts = _demo_texts(demo_corpus_path)
    folder = _train_hf_folder("wordpiece", texts, tmp_path / "thudm")
    vocab = load_tokenizer(folder).padded_vocab_size
    (folder / "config.json").write_text(json.dumps(thudm_config(vocab)))
    save_file(thudm_weights(vocab), str(folder / "model.safetensors"))
    result = import_from_hf(folder, tmp_path / "imported")
    assert result.tokenizer == (tmp_path / "imported" / "tokenizer").resolve()

    corpus = tmp_path / "tiny.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[:40]))
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    tool = Path(__file__).resolve().parents[2] / "tools" / "preprocess_data.py"
    prep = subprocess.run(
        [sys.executable, str(tool), "--input", str(corpus), "--output-prefix",
         str(tmp_path / "wp"), "--tokenizer-model", str(result.tokenizer), "--append-eod",
         "--no-progress"],
        env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert prep.returncode == 0, prep.stderr[-2000:]

    saved = saved_config(result.tag_dir)
    assert saved is not None
    run = tmp_path / "run.yaml"
    run.write_text(
        yaml.safe_dump(
            {
                "model": saved["model"],
                "data": {
                    "data_path": [str(tmp_path / "wp_text_document")],
                    "tokenizer_model": saved["data"]["tokenizer_model"],
                    "seq_length": 48,
                    "num_workers": 0,
                },
                "train": {"micro_batch_size": 2, "global_batch_size": 2, "train_iters": 1},
            }
        )
    )
    args = ["--config", str(run), f"checkpoint.load={tmp_path / 'imported'}"]
    out = _one_process([*args, f"checkpoint.save={tmp_path / 'b'}"], env, tmp_path)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-4000:]
    assert "optimizer restarts" in log
    loss = float(re.search(r"loss (\S+)", _step_fields(out.stdout)).group(1))  # type: ignore[union-attr]
    print("imported WordPiece model, step 1:", _step_fields(out.stdout))
    assert math.isfinite(loss) and loss > 0
