"""A trained (tp 2, pp 2, dp 2, ZeRO-1) checkpoint exports to a folder with the model's logits.

8 processes train glm-tiny's shape with 4 layers for 2 steps (the synthetic rows of
``test_training``) and save; the checkpoint (DeepSpeed pipeline layer files, ZeRO-1 optimizer
partitions) is exported, loaded with ``AutoModelForSeq2SeqLM`` and compared with our
``GLMModel`` holding the merged weights, on blank-infilling rows of each task.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from test_training import TINY, VOCAB, run_workers

from megatron_glm.config import ObjectiveConfig, load_config
from megatron_glm.data.blank_infilling import BlankInfilling, SpecialIds
from megatron_glm.hf.export import export_to_hf
from megatron_glm.model import GLMModel, tensor_parallel_layout
from megatron_glm.training.checkpoint import read_full_state

transformers = pytest.importorskip("transformers")
pytestmark = [pytest.mark.distributed, pytest.mark.slow, pytest.mark.xdist_group("training")]

REPO = Path(__file__).resolve().parents[2]
GLM_TINY = yaml.safe_load((REPO / "configs" / "model" / "glm-tiny.yaml").read_text())
SHAPE = [
    *(f"model.{k}={v}" for k, v in GLM_TINY.items() if k not in ("name", "vocab_size")),
    "model.num_layers=4",
]
RUN = [
    *SHAPE,
    "train.train_iters=2",
    "train.micro_batch_size=1",
    "train.global_batch_size=4",
    "train.zero_stage=1",
    "train.eval_interval=1000",
    "optimizer.warmup_iters=1",
    "parallel.tp=2",
    "parallel.pp=2",
    "checkpoint.save_interval=2",
]
IDS = SpecialIds(mask=3, smask=4, gmask=5, sop=6, eop=7, pad=2, eos=2)
S = 64


class _Window:
    def __init__(self, index: int, length: int, rng: np.random.Generator) -> None:
        self.tokens = rng.integers(10, VOCAB, size=length)
        self.sentence_starts = np.array([0, 9, 20, 33])
        self.epoch, self.index = 0, index


def test_trained_tp2_pp2_zero1_checkpoint_exports_its_logits(tmp_path: Path) -> None:
    _, log, codes = run_workers(8, [[*RUN, f"checkpoint.save={tmp_path / 'a'}"]], tmp_path)
    assert codes == [0] * 8, log[-4000:]
    tag = tmp_path / "a" / "global_step2"
    assert (tag / "layer_01-model_01-model_states.pt").is_file()
    assert (tag / "zero_pp_rank_1_mp_rank_03_optim_states.pt").is_file()
    export_to_hf(tmp_path / "a", tmp_path / "hf")
    assert_export_logits(tag, tmp_path / "hf", "tp 2 x pp 2 x dp 2 ZeRO-1")


def assert_export_logits(tag: Path, hf_dir: Path, label: str) -> None:
    """The folder's logits equal our GLMModel's holding the checkpoint's merged weights, on
    blank-infilling rows of each task (valid positions), within 1e-5."""
    cfg = load_config(None, TINY + SHAPE).model
    model = GLMModel(cfg, VOCAB)
    model.load_state_dict(read_full_state(tag, tensor_parallel_layout(cfg)))
    model.eval()
    hf = transformers.AutoModelForSeq2SeqLM.from_pretrained(hf_dir, trust_remote_code=True)
    hf.eval()
    bi = BlankInfilling(ObjectiveConfig(), seq_length=S, ids=IDS, seed=5)
    rng = np.random.default_rng(3)
    for task in ("span", "sentence", "document"):
        windows = [_Window(i, bi.window_length - 7 * i, rng) for i in range(3)]
        rows = {
            k: torch.from_numpy(np.asarray(v)) for k, v in bi.batch(windows, [task] * 3).items()
        }
        assert rows["objective"].tolist() == [("span", "sentence", "document").index(task)] * 3
        tokens, pos, sep, valid = (rows[k] for k in ("tokens", "position_ids", "sep", "valid_len"))
        with torch.no_grad():
            ours = model.logits(model(tokens, pos, sep, valid))
            theirs = hf(tokens, position_ids=pos, attention_mask=sep).logits
        mask = torch.arange(S)[None] < valid[:, None]
        diff = (ours - theirs)[mask].abs().max().item()
        print(f"{label}, {task}: max abs diff {diff:.3g}")
        assert diff < 1e-5
