"""Launch test: ``torchrun --nproc-per-node 4 -m megatron_glm.pretrain ... parallel.tp=2``.

The real CLI on real data (the conftest's demo corpus and tokenizer, preprocessed here) with
glm-tiny's shape: 4 processes = tp 2 x dp 2, ZeRO-1, a few steps. Rank 0 logs the layout.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from megatron_glm.data.preprocess import preprocess_data

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]


def test_torchrun_pretrain_with_tp2_logs_layout_and_trains(
    tmp_path: Path, demo_corpus_path: Path, tiny_tokenizer_model: Path
) -> None:
    prefix = tmp_path / "data" / "corpus"
    preprocess_data([demo_corpus_path], prefix, tiny_tokenizer_model, progress=False)
    data_prefix = str(next((tmp_path / "data").glob("*.bin"))).removesuffix(".bin")
    model = yaml.safe_load((ROOT / "configs" / "model" / "glm-tiny.yaml").read_text())
    run = {
        "model": {**model, "max_position_embeddings": 64},
        "data": {
            "data_path": [data_prefix],
            "tokenizer_model": str(tiny_tokenizer_model),
            "seq_length": 64,
            "num_workers": 0,
        },
        "train": {"micro_batch_size": 2, "global_batch_size": 4, "train_iters": 3, "zero_stage": 1},
        "logging": {"log_interval": 1, "progress_bar": False},
    }
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(run))
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    assert torchrun is not None
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        [
            torchrun,
            "--standalone",
            "--nproc-per-node",
            "4",
            "-m",
            "megatron_glm.pretrain",
            "--config",
            str(config),
            "parallel.tp=2",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        cwd=ROOT,
        start_new_session=True,  # one process group: a timeout kills the workers too
    )
    try:
        out, _ = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"torchrun timed out:\n{out[-4000:]}")
    assert proc.returncode == 0, out[-4000:]
    assert "parallel layout: world 4 = tp 2 x pp 1 x dp 2 | rank 0 -> tp 0, pp 0, dp 0" in out
    steps = [line for line in out.splitlines() if line.startswith("step ")]
    assert [s.split(" |")[0] for s in steps] == ["step 1/3", "step 2/3", "step 3/3"], out[-3000:]
