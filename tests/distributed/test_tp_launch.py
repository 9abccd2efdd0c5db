"""Launch tests: ``torchrun --nproc-per-node 8 -m megatron_glm.pretrain ... parallel.tp=2
parallel.pp=2`` against ``python -m megatron_glm.pretrain`` on one process, and the same on two
"nodes" (two torchrun agents, ``--nnodes 2 --nproc-per-node 2``, on loopback).

The real CLI on real data (the conftest's demo corpus and tokenizer, preprocessed here) with
glm-tiny's shape: 8 processes = tp 2 x pp 2 x dp 2, ZeRO-1, dropout off, 10 steps. Rank 0 logs
the 3D layout and the pipeline bubble; the per-step losses (read from both runs' TensorBoard
scalars, float32) equal the single process's, which trains the same global batches: the data
pipeline shards rows by data-parallel rank only, so both read the same rows per step.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from megatron_glm.data.preprocess import preprocess_data
from megatron_glm.training.distributed import free_port

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
STEPS = 10


def _run(cmd: list[str], timeout: float) -> str:
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)  # the single-process run must not inherit a launcher's variables
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        cwd=ROOT,
        start_new_session=True,  # one process group: a timeout kills the workers too
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"{cmd[0]} timed out:\n{out[-4000:]}")
    assert proc.returncode == 0, out[-4000:]
    return out


def _losses(tb_dir: Path) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir))
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars("train/loss")}


def _write_run(tmp_path: Path, corpus: Path, tokenizer: Path, steps: int) -> Path:
    """glm-tiny without dropout on the demo corpus (preprocessed here), micro 1, global 4."""
    prefix = tmp_path / "data" / "corpus"
    preprocess_data([corpus], prefix, tokenizer, progress=False)
    data_prefix = str(next((tmp_path / "data").glob("*.bin"))).removesuffix(".bin")
    model = yaml.safe_load((ROOT / "configs" / "model" / "glm-tiny.yaml").read_text())
    run: dict[str, Any] = {
        "model": {
            **model,
            "max_position_embeddings": 64,
            "hidden_dropout": 0.0,
            "attention_dropout": 0.0,
        },
        "data": {
            "data_path": [data_prefix],
            "tokenizer_model": str(tokenizer),
            "seq_length": 64,
            "num_workers": 0,
        },
        "optimizer": {"lr": 0.003, "warmup_iters": 2},
        "train": {
            "micro_batch_size": 1,
            "global_batch_size": 4,
            "train_iters": steps,
            "zero_stage": 1,
        },
        "logging": {"log_interval": 1, "progress_bar": False},
    }
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(run))
    return config


def test_torchrun_3d_pretrain_logs_layout_and_equals_one_process(
    tmp_path: Path, demo_corpus_path: Path, tiny_tokenizer_model: Path
) -> None:
    config = _write_run(tmp_path, demo_corpus_path, tiny_tokenizer_model, STEPS)
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    assert torchrun is not None
    cli = ["-m", "megatron_glm.pretrain", "--config", str(config)]
    layout = ["parallel.tp=2", "parallel.pp=2", f"logging.tensorboard_dir={tmp_path / 'tb8'}"]
    out = _run([torchrun, "--standalone", "--nproc-per-node", "8", *cli, *layout], timeout=420)
    assert "parallel layout: world 8 = tp 2 x pp 2 x dp 2 | rank 0 -> tp 0, pp 0, dp 0" in out
    steps = [line for line in out.splitlines() if line.startswith("step ")]
    assert [s.split(" |")[0] for s in steps] == [f"step {i}/{STEPS}" for i in range(1, 11)]
    assert all(s.endswith("| tp 2 pp 2 dp 2, bubble 33.3%") for s in steps), steps[-1]
    assert "tied embedding / output head copies: max |difference| 0" in out
    single = _run(
        [sys.executable, *cli, f"logging.tensorboard_dir={tmp_path / 'tb1'}"], timeout=240
    )
    assert "parallel layout: world 1 = tp 1 x pp 1 x dp 1" in single
    got, want = _losses(tmp_path / "tb8"), _losses(tmp_path / "tb1")
    assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))
    worst = max(abs(got[s] - want[s]) / want[s] for s in want)
    assert worst < 1e-4, (worst, got, want)
    print(f"8-process (tp 2, pp 2, dp 2) vs 1 process: max relative loss difference {worst:.2e}")


def _run_nodes(cmds: list[list[str]], logs: Path, timeout: float) -> list[str]:
    """Run one torchrun agent per "node" at once (each its own process group); their outputs.

    Each agent writes to a file, not a pipe: a pipe not read while the other agent is awaited
    could fill and stall that node.
    """
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    files = [logs / f"node{i}.log" for i in range(len(cmds))]
    procs = []
    for cmd, path in zip(cmds, files, strict=True):
        with path.open("w") as out:
            procs.append(
                subprocess.Popen(
                    cmd,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env=env,
                    cwd=ROOT,
                    start_new_session=True,  # one process group per node: a timeout kills all
                )
            )
    try:
        for proc in procs:
            proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(
            "a torchrun node timed out:\n" + "\n".join(f.read_text()[-3000:] for f in files)
        )
    outs = [f.read_text() for f in files]
    for proc, out in zip(procs, outs, strict=True):
        assert proc.returncode == 0, out[-4000:]
    return outs


def test_two_nodes_tp_inside_pp_across_equal_one_process(
    tmp_path: Path, demo_corpus_path: Path, tiny_tokenizer_model: Path
) -> None:
    """Two torchrun agents (--nnodes 2, --nproc-per-node 2) on loopback, as two hosts would run.

    Ranks 0-1 are node 0 and 2-3 node 1; with ``rank = (pp_rank * dp + dp_rank) * tp + tp_rank``
    the TP pairs are {0, 1} and {2, 3} (inside a node) and the pipeline's stage boundary is the
    node boundary, which is the layout the planner asks for (TP on the fast links).
    """
    steps = 4
    config = _write_run(tmp_path, demo_corpus_path, tiny_tokenizer_model, steps)
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    assert torchrun is not None
    cli = ["-m", "megatron_glm.pretrain", "--config", str(config)]
    port = free_port()
    nodes = [
        [
            torchrun,
            *("--nnodes", "2", "--nproc-per-node", "2", "--node-rank", str(node)),
            *("--master-addr", "127.0.0.1", "--master-port", str(port)),
            *cli,
            *("parallel.tp=2", "parallel.pp=2", f"logging.tensorboard_dir={tmp_path / 'tb4'}"),
        ]
        for node in (0, 1)
    ]
    head, _ = _run_nodes(nodes, tmp_path, timeout=300)
    layout = next(line for line in head.splitlines() if "parallel layout:" in line)
    step_lines = [line for line in head.splitlines() if line.startswith("step ")]
    print(layout, *step_lines, sep="\n")
    assert "parallel layout: world 4 = tp 2 x pp 2 x dp 1 | rank 0 -> tp 0, pp 0, dp 0" in layout
    assert [s.split(" |")[0] for s in step_lines] == [f"step {i}/{steps}" for i in range(1, 5)]
    assert all(s.endswith("| tp 2 pp 2 dp 1, bubble 20.0%") for s in step_lines), step_lines
    _run([sys.executable, *cli, f"logging.tensorboard_dir={tmp_path / 'tb1'}"], 240)
    got, want = _losses(tmp_path / "tb4"), _losses(tmp_path / "tb1")
    assert sorted(got) == sorted(want) == list(range(1, steps + 1))
    worst = max(abs(got[s] - want[s]) / want[s] for s in want)
    assert worst < 1e-4, (worst, got, want)
    print(
        f"2 nodes x 2 processes (tp 2 in a node, pp 2 across) vs 1 process: max relative "
        f"loss difference {worst:.2e}"
    )
