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
from typing import Any

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


def _cloze_task(folder: Path) -> None:
    """A small cloze task: does the text hold ``data``? (train 8, validation 6 rows)."""
    import json
    import random

    rng, words = random.Random(3), ["data", "file", "list", "value", "name", "type"]
    folder.mkdir()
    for split, n in (("train", 8), ("validation", 6), ("test", 2)):
        rows = []
        for _ in range(n):
            text = [rng.choice(words) for _ in range(6)]
            rows.append({"text": " ".join(text), "label": "yes" if "data" in text else "no"})
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _direct_losses(model: Any, cfg: Any) -> tuple[float, float]:
    """(step-0 validation loss, step-1 training loss) of ``model`` run in this process with the
    run's task loss on the rows the run reads at those steps."""
    from megatron_glm.finetune.run import FinetuneData, read_split, task_loss
    from megatron_glm.training.batches import MODEL_INPUTS

    loss, collate = task_loss(cfg, load_tokenizer(cfg.data.tokenizer_model))
    t = cfg.train
    data = FinetuneData(
        read_split(cfg, "train"), None, collate,
        micro_batch_size=t.micro_batch_size, dp_rank=0, dp_size=1, seed=t.seed,
    )  # fmt: skip
    train = data.train_batches(0)
    step1 = [next(train) for _ in range(t.global_batch_size // t.micro_batch_size)]

    def mean(batches: list[Any]) -> float:
        total = count = 0.0
        with torch.no_grad():
            for b in batches:
                out = loss(model, model(*(b[k] for k in MODEL_INPUTS)), b)
                total, count = total + float(out.sum_loss), count + float(out.num_tokens)
        return total / count

    return mean(data.eval_batches(read_split(cfg, "validation"))), mean(step1)


@pytest.mark.slow
def test_finetune_init_from_an_import(tmp_path: Path, tiny_tokenizer_model: Path) -> None:
    """A random model (seeded unlike the run, with non-trivial biases and norms) through our
    checkpoint, ``to-hf`` and ``from-hf``; ``glm-finetune`` with ``finetune.init`` at the import
    starts from exactly the HF folder's weights: its step-0 validation loss and step-1 training
    loss (TensorBoard, float32) equal a direct forward of those weights."""
    import subprocess
    import sys

    import yaml
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from megatron_glm.inference import build_for_inference, hf_weights

    _cloze_task(tmp_path / "task")
    run = tmp_path / "finetune.yaml"
    run.write_text(
        yaml.safe_dump(
            {
                "model": {"num_layers": 2, "hidden_size": 32, "num_attention_heads": 2,
                          "max_position_embeddings": 64, "kernels": "torch",
                          "hidden_dropout": 0.0, "attention_dropout": 0.0},
                "data": {"tokenizer_model": str(tiny_tokenizer_model), "seq_length": 32},
                "train": {"micro_batch_size": 2, "global_batch_size": 4, "train_iters": 1,
                          "eval_interval": 1},
                "logging": {"log_interval": 1, "progress_bar": False},
                "finetune": {"task": "cloze", "task_dir": str(tmp_path / "task"),
                             "patterns": ["{text} Package: [MASK]."],
                             "verbalizers": {"no": "no", "yes": "yes please"}},
            }
        )
    )  # fmt: skip
    cfg = load_config(run, [])
    vocab = load_tokenizer(cfg.data.tokenizer_model).padded_vocab_size
    model = build_model(replace(cfg.model, vocab_size=vocab), seed=cfg.train.seed + 1)
    with torch.no_grad():  # zero biases and unit norms would hide a swapped bias or norm
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))))
    _checkpoint(tmp_path / "ours", model)
    export_to_hf(tmp_path / "ours", tmp_path / "hf")
    import_from_hf(tmp_path / "hf", tmp_path / "imported", run_config=run)

    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    tb = tmp_path / "tb"
    args = [f"finetune.init={tmp_path / 'imported'}", f"logging.tensorboard_dir={tb}"]
    out = subprocess.run(
        [sys.executable, "-m", "megatron_glm.finetune", "--config", str(run), *args],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-4000:]
    assert f"finetune: weights from {tmp_path / 'imported'}" in log
    events = EventAccumulator(str(tb))
    events.Reload()
    valid0 = next(e.value for e in events.Scalars("valid/loss") if e.step == 0)
    train1 = next(e.value for e in events.Scalars("train/loss") if e.step == 1)
    hf = build_for_inference(hf_weights(tmp_path / "hf"))  # the HF files, not the import
    want_valid, want_train = _direct_losses(hf, cfg)
    print(f"from an HF import: step-0 validation {valid0:.6f} (direct {want_valid:.6f}), "
          f"step-1 loss {train1:.6f} (direct {want_train:.6f})")  # fmt: skip
    assert valid0 == pytest.approx(want_valid, rel=1e-5)
    assert train1 == pytest.approx(want_train, rel=1e-5)
    # the run's own seed's weights (what it trains without finetune.init) score otherwise
    fresh = build_model(replace(cfg.model, vocab_size=vocab), seed=cfg.train.seed).eval()
    assert abs(_direct_losses(fresh, cfg)[0] - valid0) > 1e-3 * valid0
